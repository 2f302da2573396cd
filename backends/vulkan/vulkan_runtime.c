/*
 * The Vulkan machinery the backend's files share: the process-wide instance
 * and its devices, opening a context's device, memory and staging copies,
 * the pipeline cache and layouts, command recording and submission, and the
 * status-word readback. It calls no other file of the backend.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "env.h"
#include "vulkan_internal.h"

#define STAGING_BYTES ((VkDeviceSize)16 << 20)
#define VALIDATION_LAYER "VK_LAYER_KHRONOS_validation"

/* ---------------------------------------------------------------- instance */

static pthread_once_t instance_once = PTHREAD_ONCE_INIT;
static vk_instance the_instance;
static char instance_error[QATTN_NAME_MAX];
static bool instance_ok;

void vk_str_append(char *buf, size_t len, const char *fmt, ...)
{
    size_t used = strlen(buf);
    if (used + 1 >= len)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf + used, len - used, fmt, ap);
    va_end(ap);
}

static bool has_ext(const VkExtensionProperties *exts, uint32_t n, const char *name)
{
    for (uint32_t i = 0; i < n; i++)
        if (strcmp(exts[i].extensionName, name) == 0)
            return true;
    return false;
}

/* The device's extensions and features; false (with c->unusable) when out of memory.
 * *sm_builtins and *amd_cores: the extensions that report the number of compute units. */
static bool gather_features(vk_device_caps *c, bool coopmat_allowed, bool *sm_builtins, bool *amd_cores)
{
    VkPhysicalDevice pd = c->phys;
    uint32_t n_ext = 0;
    vkEnumerateDeviceExtensionProperties(pd, NULL, &n_ext, NULL);
    VkExtensionProperties *exts = calloc(n_ext ? n_ext : 1, sizeof(*exts));
    if (!exts) {
        snprintf(c->unusable, sizeof(c->unusable), "out of host memory");
        return false;
    }
    vkEnumerateDeviceExtensionProperties(pd, NULL, &n_ext, exts);
    const bool v12 = c->api_version >= VK_API_VERSION_1_2, v13 = c->api_version >= VK_API_VERSION_1_3;
    c->ext_16bit_storage = has_ext(exts, n_ext, VK_KHR_16BIT_STORAGE_EXTENSION_NAME);
    c->ext_8bit_storage = has_ext(exts, n_ext, VK_KHR_8BIT_STORAGE_EXTENSION_NAME);
    c->ext_float16_int8 = has_ext(exts, n_ext, VK_KHR_SHADER_FLOAT16_INT8_EXTENSION_NAME);
    c->ext_subgroup_size_control = has_ext(exts, n_ext, VK_EXT_SUBGROUP_SIZE_CONTROL_EXTENSION_NAME);
    c->ext_int_dot = has_ext(exts, n_ext, VK_KHR_SHADER_INTEGER_DOT_PRODUCT_EXTENSION_NAME);
    c->ext_storage_buffer_class = has_ext(exts, n_ext, VK_KHR_STORAGE_BUFFER_STORAGE_CLASS_EXTENSION_NAME);
    c->coopmat = coopmat_allowed && has_ext(exts, n_ext, VK_KHR_COOPERATIVE_MATRIX_EXTENSION_NAME);
    c->coopmat2_nv = has_ext(exts, n_ext, "VK_NV_cooperative_matrix2");
    c->float8_ext = has_ext(exts, n_ext, "VK_EXT_shader_float8");
    c->bfloat16_ext = has_ext(exts, n_ext, "VK_KHR_shader_bfloat16");
    *sm_builtins = has_ext(exts, n_ext, VK_NV_SHADER_SM_BUILTINS_EXTENSION_NAME);
    *amd_cores = has_ext(exts, n_ext, VK_AMD_SHADER_CORE_PROPERTIES_EXTENSION_NAME);
    free(exts);

    /* Features, chained only where the device knows the structure. */
    VkPhysicalDevice16BitStorageFeatures f16s = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_16BIT_STORAGE_FEATURES};
    VkPhysicalDevice8BitStorageFeatures f8s = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_8BIT_STORAGE_FEATURES};
    VkPhysicalDeviceShaderFloat16Int8Features f16i8 = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES};
    VkPhysicalDeviceSubgroupSizeControlFeatures fssc = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_SIZE_CONTROL_FEATURES};
    VkPhysicalDeviceShaderIntegerDotProductFeatures fdot = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_INTEGER_DOT_PRODUCT_FEATURES};
    VkPhysicalDeviceCooperativeMatrixFeaturesKHR fcm = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_KHR};
    VkPhysicalDeviceVulkanMemoryModelFeatures fvmm = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_MEMORY_MODEL_FEATURES};
    VkPhysicalDeviceFeatures2 f2 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2};
    void **tail = &f2.pNext;
#define CHAIN(s)               \
    do {                       \
        *tail = &(s);          \
        tail = &(s).pNext;     \
    } while (0)
    CHAIN(f16s); /* core in 1.1, which qattn requires */
    if (v12 || c->ext_8bit_storage)
        CHAIN(f8s);
    if (v12 || c->ext_float16_int8)
        CHAIN(f16i8);
    if (v13 || c->ext_subgroup_size_control)
        CHAIN(fssc);
    if (v13 || c->ext_int_dot)
        CHAIN(fdot);
    if (c->coopmat)
        CHAIN(fcm);
    if (v12)
        CHAIN(fvmm);
#undef CHAIN
    vkGetPhysicalDeviceFeatures2(pd, &f2);
    c->storage16 = f16s.storageBuffer16BitAccess;
    c->storage8 = f8s.storageBuffer8BitAccess;
    c->float16 = f16i8.shaderFloat16;
    c->int8 = f16i8.shaderInt8;
    c->float64 = f2.features.shaderFloat64;
    c->int64 = f2.features.shaderInt64;
    c->int_dot = fdot.shaderIntegerDotProduct;
    c->coopmat = c->coopmat && fcm.cooperativeMatrix;
    c->subgroup_size_control = fssc.subgroupSizeControl;
    c->full_subgroups = fssc.computeFullSubgroups;
    /* With the Vulkan memory model on, Device-scope atomics (the status words'
     * atomicOr in every shader) need vulkanMemoryModelDeviceScope too. */
    c->memory_model = fvmm.vulkanMemoryModel && fvmm.vulkanMemoryModelDeviceScope;
    return true;
}

/* The device's properties: subgroups, limits, driver, integer dot products, compute units. */
static void gather_properties(vk_device_caps *c, bool sm_builtins, bool amd_cores)
{
    const bool v12 = c->api_version >= VK_API_VERSION_1_2, v13 = c->api_version >= VK_API_VERSION_1_3;
    VkPhysicalDeviceSubgroupProperties sg = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES};
    VkPhysicalDeviceSubgroupSizeControlProperties sgc = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_SIZE_CONTROL_PROPERTIES};
    VkPhysicalDeviceMaintenance3Properties m3 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_3_PROPERTIES};
    VkPhysicalDeviceDriverProperties drv = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DRIVER_PROPERTIES};
    VkPhysicalDeviceShaderIntegerDotProductProperties dotp = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_INTEGER_DOT_PRODUCT_PROPERTIES};
    VkPhysicalDeviceProperties2 p2 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2};
    void **tail = &p2.pNext;
    *tail = &sg;
    tail = &sg.pNext;
    *tail = &m3;
    tail = &m3.pNext;
    if (v12) {
        *tail = &drv;
        tail = &drv.pNext;
    }
    if (v13 || c->ext_subgroup_size_control) {
        *tail = &sgc;
        tail = &sgc.pNext;
    }
    if (v13 || c->ext_int_dot) {
        *tail = &dotp;
        tail = &dotp.pNext;
    }
    /* The number of SMs / CUs, for the paged planner's split-KV choice. */
    VkPhysicalDeviceShaderSMBuiltinsPropertiesNV smp = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_SM_BUILTINS_PROPERTIES_NV};
    VkPhysicalDeviceShaderCorePropertiesAMD amdp = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_CORE_PROPERTIES_AMD};
    if (sm_builtins) {
        *tail = &smp;
        tail = &smp.pNext;
    }
    if (amd_cores) {
        *tail = &amdp;
        tail = &amdp.pNext;
    }
    vkGetPhysicalDeviceProperties2(c->phys, &p2);
    if (sm_builtins)
        c->compute_units = smp.shaderSMCount;
    else if (amd_cores)
        c->compute_units = amdp.shaderEngineCount * amdp.shaderArraysPerEngineCount * amdp.computeUnitsPerShaderArray;
    c->subgroup_size = sg.subgroupSize;
    c->subgroup_shuffle = (sg.supportedStages & VK_SHADER_STAGE_COMPUTE_BIT) &&
                          (sg.supportedOperations & VK_SUBGROUP_FEATURE_SHUFFLE_BIT);
    c->min_subgroup = sgc.minSubgroupSize ? sgc.minSubgroupSize : sg.subgroupSize;
    c->max_subgroup = sgc.maxSubgroupSize ? sgc.maxSubgroupSize : sg.subgroupSize;
    c->required_size_in_compute = (sgc.requiredSubgroupSizeStages & VK_SHADER_STAGE_COMPUTE_BIT) != 0;
    c->int_dot_accelerated = dotp.integerDotProduct4x8BitPackedSignedAccelerated;
    c->max_alloc = m3.maxMemoryAllocationSize;
    c->max_buffer = c->props.limits.maxStorageBufferRange;
    if (v12) {
        snprintf(c->driver_name, sizeof(c->driver_name), "%s", drv.driverName);
        snprintf(c->driver_info, sizeof(c->driver_info), "%s", drv.driverInfo);
    }
}

/* Device-local memory, the compute queue family, the cooperative-matrix shapes. */
static void gather_memory_queues_shapes(const vk_instance *inst, vk_device_caps *c)
{
    VkPhysicalDevice pd = c->phys;
    VkPhysicalDeviceMemoryProperties mp;
    vkGetPhysicalDeviceMemoryProperties(pd, &mp);
    for (uint32_t i = 0; i < mp.memoryHeapCount; i++)
        if (mp.memoryHeaps[i].flags & VK_MEMORY_HEAP_DEVICE_LOCAL_BIT)
            c->device_local_bytes += mp.memoryHeaps[i].size;

    c->queue_family = UINT32_MAX;
    uint32_t nq = 0;
    vkGetPhysicalDeviceQueueFamilyProperties(pd, &nq, NULL);
    VkQueueFamilyProperties qf[32];
    if (nq > 32)
        nq = 32;
    vkGetPhysicalDeviceQueueFamilyProperties(pd, &nq, qf);
    /* Prefer a compute-only family (dedicated), else any with compute. */
    for (uint32_t i = 0; i < nq && c->queue_family == UINT32_MAX; i++)
        if ((qf[i].queueFlags & VK_QUEUE_COMPUTE_BIT) && !(qf[i].queueFlags & VK_QUEUE_GRAPHICS_BIT))
            c->queue_family = i;
    for (uint32_t i = 0; i < nq && c->queue_family == UINT32_MAX; i++)
        if (qf[i].queueFlags & VK_QUEUE_COMPUTE_BIT)
            c->queue_family = i;

    if (c->coopmat && inst->get_coopmat_props) {
        uint32_t n = 0;
        inst->get_coopmat_props(pd, &n, NULL);
        if (n > VK_MAX_SHAPES)
            n = VK_MAX_SHAPES;
        for (uint32_t i = 0; i < n; i++)
            c->shapes[i] = (VkCooperativeMatrixPropertiesKHR){.sType = VK_STRUCTURE_TYPE_COOPERATIVE_MATRIX_PROPERTIES_KHR};
        if (inst->get_coopmat_props(pd, &n, c->shapes) >= 0)
            c->shape_count = n;
        for (uint32_t i = 0; i < c->shape_count; i++) {
            const VkCooperativeMatrixPropertiesKHR *s = &c->shapes[i];
            if (s->MSize == 16 && s->NSize == 16 && s->KSize == 16 && s->AType == VK_COMPONENT_TYPE_FLOAT16_KHR &&
                s->BType == VK_COMPONENT_TYPE_FLOAT16_KHR && s->CType == VK_COMPONENT_TYPE_FLOAT32_KHR &&
                s->ResultType == VK_COMPONENT_TYPE_FLOAT32_KHR && s->scope == VK_SCOPE_SUBGROUP_KHR)
                c->coopmat_f16_16x16x16 = true;
        }
    }
}

/* Gathers what one physical device offers and whether qattn can use it. */
static void gather_caps(const vk_instance *inst, vk_device_caps *c)
{
    vkGetPhysicalDeviceProperties(c->phys, &c->props);
    c->api_version = c->props.apiVersion;
    bool sm_builtins = false, amd_cores = false;
    /* A validation layer older than VK_KHR_cooperative_matrix (1.3.255, e.g.
     * Debian bookworm's 1.3.239) reports its structures as unknown: under such
     * a layer the extension is left alone and the portable kernels run. */
    const bool coopmat_allowed =
        !inst->validation || inst->validation_layer_version >= VK_MAKE_API_VERSION(0, 1, 3, 255);
    if (!gather_features(c, coopmat_allowed, &sm_builtins, &amd_cores))
        return;
    gather_properties(c, sm_builtins, amd_cores);
    gather_memory_queues_shapes(inst, c);

    if (c->api_version < VK_API_VERSION_1_1)
        snprintf(c->unusable, sizeof(c->unusable), "Vulkan %u.%u device; qattn needs Vulkan 1.1",
                 VK_API_VERSION_MAJOR(c->api_version), VK_API_VERSION_MINOR(c->api_version));
    else if (c->queue_family == UINT32_MAX)
        snprintf(c->unusable, sizeof(c->unusable), "no queue family with compute");
    else if (!c->storage16)
        snprintf(c->unusable, sizeof(c->unusable), "no 16-bit storage buffer access (storageBuffer16BitAccess)");
    else if (c->props.limits.maxPerStageDescriptorStorageBuffers < VK_BINDINGS - 1 ||
             c->props.limits.maxDescriptorSetStorageBuffers < VK_BINDINGS - 1)
        snprintf(c->unusable, sizeof(c->unusable), "%u storage buffers per stage (the attention kernels bind %d)",
                 c->props.limits.maxPerStageDescriptorStorageBuffers, VK_BINDINGS - 1);
}

/* Lists the usable devices of the instance, GPUs first; false (with instance_error) when there is none. */
static bool list_devices(vk_instance *inst)
{
    uint32_t n = 0;
    vkEnumeratePhysicalDevices(inst->instance, &n, NULL);
    VkPhysicalDevice pds[VK_MAX_DEVICES];
    if (n > VK_MAX_DEVICES)
        n = VK_MAX_DEVICES;
    if (n)
        vkEnumeratePhysicalDevices(inst->instance, &n, pds);
    if (n == 0) {
        snprintf(instance_error, sizeof(instance_error), "the Vulkan loader found no device (no driver installed?)");
        return false;
    }
    /* Usable devices first, in the loader's order; qattn's index counts only those. */
    char why[QATTN_NAME_MAX] = "";
    for (uint32_t i = 0; i < n; i++) {
        vk_device_caps c = {.phys = pds[i]};
        gather_caps(inst, &c);
        if (c.unusable[0]) {
            vk_str_append(why, sizeof(why), "%s%s: %s", why[0] ? "; " : "", c.props.deviceName, c.unusable);
            continue;
        }
        inst->devices[inst->device_count++] = c;
    }
    /* GPUs before CPU implementations (lavapipe), so device 0 is the fast one;
     * the loader's order is kept within each kind. */
    for (int i = 1; i < inst->device_count; i++)
        for (int j = i; j > 0 && inst->devices[j - 1].props.deviceType == VK_PHYSICAL_DEVICE_TYPE_CPU &&
                        inst->devices[j].props.deviceType != VK_PHYSICAL_DEVICE_TYPE_CPU;
             j--) {
            vk_device_caps tmp = inst->devices[j];
            inst->devices[j] = inst->devices[j - 1];
            inst->devices[j - 1] = tmp;
        }
    if (inst->device_count == 0) {
        instance_error[0] = '\0';
        vk_str_append(instance_error, sizeof(instance_error), "no usable Vulkan device (%s)", why);
        return false;
    }
    return true;
}

/* ---------------------------------------------------------------- validation */

static pthread_mutex_t validation_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t validation_errors, validation_warnings;
static char validation_latest[768]; /* the latest error's text */

static VKAPI_ATTR VkBool32 VKAPI_CALL validation_message(VkDebugUtilsMessageSeverityFlagBitsEXT severity,
                                                         VkDebugUtilsMessageTypeFlagsEXT types,
                                                         const VkDebugUtilsMessengerCallbackDataEXT *data, void *user)
{
    (void)types;
    (void)user;
    const bool error = (severity & VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT) != 0;
    const char *text = data && data->pMessage ? data->pMessage : "(no message)";
    pthread_mutex_lock(&validation_lock);
    if (error) {
        validation_errors++;
        snprintf(validation_latest, sizeof(validation_latest), "%s", text);
    } else {
        validation_warnings++;
    }
    pthread_mutex_unlock(&validation_lock);
    fprintf(stderr, "qattn: Vulkan validation %s: %s\n", error ? "error" : "warning", text);
    return VK_FALSE; /* the call goes on as the application made it */
}

/* An error that no call returned (in a destroy, say) must still fail the
 * program: at exit, any error makes the exit status 1. */
static void validation_at_exit(void)
{
    pthread_mutex_lock(&validation_lock);
    const uint64_t errors = validation_errors, warnings = validation_warnings;
    pthread_mutex_unlock(&validation_lock);
    fprintf(stderr,
            "qattn: Vulkan validation (QATTN_VULKAN_VALIDATION=1): %llu errors, %llu warnings in this process\n",
            (unsigned long long)errors, (unsigned long long)warnings);
    if (errors) {
        fflush(NULL);
        _Exit(1);
    }
}

qattn_status vk_validation_check(qattn_ctx *ctx, vk_ctx *vc)
{
    if (!the_instance.validation)
        return QATTN_OK;
    pthread_mutex_lock(&validation_lock);
    const uint64_t errors = validation_errors, fresh = errors - vc->validation_errors_seen;
    char latest[sizeof(validation_latest)];
    memcpy(latest, validation_latest, sizeof(latest));
    vc->validation_errors_seen = errors;
    pthread_mutex_unlock(&validation_lock);
    if (!fresh)
        return QATTN_OK;
    return qattn_set_error(ctx, QATTN_ERR_BACKEND,
                           "the Vulkan validation layer reported %llu error(s) since this context's last call "
                           "(QATTN_VULKAN_VALIDATION=1; each is printed to stderr); the latest: %s",
                           (unsigned long long)fresh, latest);
}

/* Whether the validation layer and the instance extensions it needs are
 * there; else why not, in inst->validation_unavailable. */
static bool validation_layer_found(vk_instance *inst)
{
    uint32_t n = 0;
    vkEnumerateInstanceLayerProperties(&n, NULL);
    VkLayerProperties *layers = calloc(n ? n : 1, sizeof(*layers));
    if (!layers) {
        snprintf(inst->validation_unavailable, sizeof(inst->validation_unavailable), "out of host memory");
        return false;
    }
    vkEnumerateInstanceLayerProperties(&n, layers);
    for (uint32_t i = 0; i < n; i++)
        if (strcmp(layers[i].layerName, VALIDATION_LAYER) == 0)
            inst->validation_layer_version = layers[i].specVersion;
    free(layers);
    if (!inst->validation_layer_version) {
        snprintf(inst->validation_unavailable, sizeof(inst->validation_unavailable),
                 "QATTN_VULKAN_VALIDATION=1 asks for " VALIDATION_LAYER ", which the Vulkan loader does not find "
                 "(Debian: apt install vulkan-validationlayers; or set VK_LAYER_PATH to the folder of its manifest)");
        return false;
    }
    n = 0;
    vkEnumerateInstanceExtensionProperties(VALIDATION_LAYER, &n, NULL);
    VkExtensionProperties *exts = calloc(n ? n : 1, sizeof(*exts));
    if (!exts) {
        snprintf(inst->validation_unavailable, sizeof(inst->validation_unavailable), "out of host memory");
        return false;
    }
    vkEnumerateInstanceExtensionProperties(VALIDATION_LAYER, &n, exts);
    const bool utils = has_ext(exts, n, VK_EXT_DEBUG_UTILS_EXTENSION_NAME);
    const bool features = has_ext(exts, n, VK_EXT_VALIDATION_FEATURES_EXTENSION_NAME);
    free(exts);
    if (!utils || !features) {
        snprintf(inst->validation_unavailable, sizeof(inst->validation_unavailable),
                 "QATTN_VULKAN_VALIDATION=1: " VALIDATION_LAYER " %u.%u.%u lacks %s",
                 VK_API_VERSION_MAJOR(inst->validation_layer_version),
                 VK_API_VERSION_MINOR(inst->validation_layer_version),
                 VK_API_VERSION_PATCH(inst->validation_layer_version),
                 !utils ? VK_EXT_DEBUG_UTILS_EXTENSION_NAME : VK_EXT_VALIDATION_FEATURES_EXTENSION_NAME);
        return false;
    }
    return true;
}

static void create_instance(void)
{
    vk_instance *inst = &the_instance;
    VkResult r = volkInitialize();
    if (r != VK_SUCCESS) {
        snprintf(instance_error, sizeof(instance_error),
                 "the Vulkan loader (libvulkan.so.1) could not be loaded: install the Vulkan ICD loader (libvulkan1) "
                 "and a driver");
        return;
    }
    inst->api_version = volkGetInstanceVersion();
    if (inst->api_version < VK_API_VERSION_1_1) {
        snprintf(instance_error, sizeof(instance_error), "the Vulkan loader offers %u.%u; qattn needs 1.1",
                 VK_API_VERSION_MAJOR(inst->api_version), VK_API_VERSION_MINOR(inst->api_version));
        return;
    }
    /* Enumerate portability drivers too (MoltenVK and friends). */
    uint32_t n_ext = 0;
    vkEnumerateInstanceExtensionProperties(NULL, &n_ext, NULL);
    VkExtensionProperties *exts = calloc(n_ext ? n_ext : 1, sizeof(*exts));
    bool portability = false;
    if (exts) {
        vkEnumerateInstanceExtensionProperties(NULL, &n_ext, exts);
        portability = has_ext(exts, n_ext, "VK_KHR_portability_enumeration");
        free(exts);
    }
    qattn_env env;
    qattn_env_read(&env, NULL);
    const bool validation = env.vulkan_validation && validation_layer_found(inst);
    const char *ext_names[3];
    uint32_t ext_count = 0;
    if (portability)
        ext_names[ext_count++] = "VK_KHR_portability_enumeration";
    if (validation) {
        ext_names[ext_count++] = VK_EXT_DEBUG_UTILS_EXTENSION_NAME;
        ext_names[ext_count++] = VK_EXT_VALIDATION_FEATURES_EXTENSION_NAME;
    }
    const char *layer_names[] = {VALIDATION_LAYER};
    /* Synchronization validation on top of the core checks: the kernels'
     * barriers between dispatches and copies are what it checks. */
    const VkValidationFeatureEnableEXT enables[] = {VK_VALIDATION_FEATURE_ENABLE_SYNCHRONIZATION_VALIDATION_EXT};
    VkDebugUtilsMessengerCreateInfoEXT messenger_info = {
        .sType = VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT,
        .messageSeverity =
            VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT,
        .messageType = VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT |
                       VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT,
        .pfnUserCallback = validation_message,
    };
    VkValidationFeaturesEXT features = {.sType = VK_STRUCTURE_TYPE_VALIDATION_FEATURES_EXT,
                                        .pNext = &messenger_info, /* also reports on vkCreateInstance itself */
                                        .enabledValidationFeatureCount = 1,
                                        .pEnabledValidationFeatures = enables};
    VkApplicationInfo app = {
        .sType = VK_STRUCTURE_TYPE_APPLICATION_INFO,
        .pApplicationName = "qattn",
        .applicationVersion = QATTN_VERSION_NUMBER,
        .pEngineName = "qattn",
        .engineVersion = QATTN_VERSION_NUMBER,
        .apiVersion = inst->api_version >= VK_API_VERSION_1_3 ? VK_API_VERSION_1_3 : inst->api_version,
    };
    VkInstanceCreateInfo ci = {
        .sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO,
        .pNext = validation ? &features : NULL,
        .flags = portability ? 0x00000001 /* VK_INSTANCE_CREATE_ENUMERATE_PORTABILITY_BIT_KHR */ : 0,
        .pApplicationInfo = &app,
        .enabledLayerCount = validation ? 1 : 0,
        .ppEnabledLayerNames = layer_names,
        .enabledExtensionCount = ext_count,
        .ppEnabledExtensionNames = ext_names,
    };
    r = vkCreateInstance(&ci, NULL, &inst->instance);
    if (validation && r != VK_SUCCESS && r != VK_ERROR_INCOMPATIBLE_DRIVER) {
        /* Probing still works without the layer; contexts fail with this. */
        snprintf(inst->validation_unavailable, sizeof(inst->validation_unavailable),
                 "QATTN_VULKAN_VALIDATION=1: vkCreateInstance with " VALIDATION_LAYER " failed (VkResult %d)", (int)r);
        ci.pNext = NULL;
        ci.enabledLayerCount = 0;
        ci.enabledExtensionCount = portability ? 1 : 0;
        r = vkCreateInstance(&ci, NULL, &inst->instance);
    } else if (validation && r == VK_SUCCESS) {
        inst->validation = true;
    }
    if (r == VK_ERROR_INCOMPATIBLE_DRIVER) {
        snprintf(instance_error, sizeof(instance_error),
                 "the Vulkan loader found no driver (VK_ERROR_INCOMPATIBLE_DRIVER): install one (e.g. "
                 "mesa-vulkan-drivers for lavapipe) or check VK_DRIVER_FILES / VK_ICD_FILENAMES");
        return;
    }
    if (r != VK_SUCCESS) {
        snprintf(instance_error, sizeof(instance_error), "vkCreateInstance failed (VkResult %d)", (int)r);
        return;
    }
    volkLoadInstanceOnly(inst->instance);
    if (inst->validation) {
        r = vkCreateDebugUtilsMessengerEXT(inst->instance, &messenger_info, NULL, &inst->messenger);
        if (r != VK_SUCCESS) {
            inst->validation = false;
            snprintf(inst->validation_unavailable, sizeof(inst->validation_unavailable),
                     "QATTN_VULKAN_VALIDATION=1: vkCreateDebugUtilsMessengerEXT failed (VkResult %d)", (int)r);
        } else {
            atexit(validation_at_exit);
        }
    }
    inst->get_coopmat_props = (PFN_vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR)vkGetInstanceProcAddr(
        inst->instance, "vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR");
    instance_ok = list_devices(inst);
}

const vk_instance *vk_instance_get(char *reason, size_t reason_len)
{
    pthread_once(&instance_once, create_instance);
    if (!instance_ok) {
        if (reason) {
            reason[0] = '\0';
            vk_str_append(reason, reason_len, "%s", instance_error);
        }
        return NULL;
    }
    return &the_instance;
}

/* ---------------------------------------------------------------- memory */

qattn_status vk_check(qattn_ctx *ctx, VkResult r, const char *what)
{
    if (r == VK_SUCCESS)
        return QATTN_OK;
    vk_ctx *vc = ctx->impl;
    switch (r) {
    case VK_ERROR_OUT_OF_HOST_MEMORY:
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "%s: out of host memory", what);
    case VK_ERROR_OUT_OF_DEVICE_MEMORY:
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "%s: out of device memory", what);
    case VK_ERROR_DEVICE_LOST:
        if (vc)
            vc->lost = true;
        return qattn_set_error(ctx, QATTN_ERR_DEVICE_LOST, "%s: the Vulkan device was lost", what);
    default:
        return qattn_set_error(ctx, QATTN_ERR_BACKEND, "%s failed (VkResult %d)", what, (int)r);
    }
}

static int find_memory_type(VkPhysicalDevice pd, uint32_t allowed, VkMemoryPropertyFlags want,
                            VkMemoryPropertyFlags avoid)
{
    VkPhysicalDeviceMemoryProperties mp;
    vkGetPhysicalDeviceMemoryProperties(pd, &mp);
    for (uint32_t i = 0; i < mp.memoryTypeCount; i++)
        if ((allowed & (1u << i)) && (mp.memoryTypes[i].propertyFlags & want) == want &&
            !(mp.memoryTypes[i].propertyFlags & avoid))
            return (int)i;
    return -1;
}

qattn_status vk_mem_create(qattn_ctx *ctx, vk_ctx *vc, VkDeviceSize size, uint32_t type, bool map, vk_mem *out,
                           const char *what)
{
    memset(out, 0, sizeof(*out));
    VkBufferCreateInfo bi = {
        .sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO,
        .size = size,
        .usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_UNIFORM_BUFFER_BIT |
                 VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT,
        .sharingMode = VK_SHARING_MODE_EXCLUSIVE,
    };
    qattn_status s = vk_check(ctx, vc->vk.vkCreateBuffer(vc->device, &bi, NULL, &out->buffer), what);
    if (s)
        return s;
    VkMemoryRequirements req;
    vc->vk.vkGetBufferMemoryRequirements(vc->device, out->buffer, &req);
    if (!(req.memoryTypeBits & (1u << type))) {
        vc->vk.vkDestroyBuffer(vc->device, out->buffer, NULL);
        out->buffer = VK_NULL_HANDLE;
        return qattn_set_error(ctx, QATTN_ERR_BACKEND, "%s: the driver allows no suitable memory type", what);
    }
    VkMemoryAllocateInfo ai = {.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO, .allocationSize = req.size,
                               .memoryTypeIndex = type};
    s = vk_check(ctx, vc->vk.vkAllocateMemory(vc->device, &ai, NULL, &out->memory), what);
    if (!s)
        s = vk_check(ctx, vc->vk.vkBindBufferMemory(vc->device, out->buffer, out->memory, 0), what);
    if (!s && map)
        s = vk_check(ctx, vc->vk.vkMapMemory(vc->device, out->memory, 0, VK_WHOLE_SIZE, 0, &out->mapped), what);
    if (s) {
        vk_mem_destroy(vc, out);
        return s;
    }
    out->size = size;
    return QATTN_OK;
}

void vk_mem_destroy(vk_ctx *vc, vk_mem *m)
{
    if (m->buffer)
        vc->vk.vkDestroyBuffer(vc->device, m->buffer, NULL);
    if (m->memory)
        vc->vk.vkFreeMemory(vc->device, m->memory, NULL); /* unmaps too */
    memset(m, 0, sizeof(*m));
}

qattn_status vk_staged_copy(qattn_ctx *ctx, vk_ctx *vc, VkBuffer buffer, size_t offset, void *host, size_t bytes,
                            vk_copy_kind kind, uint8_t value)
{
    qattn_status s = QATTN_OK;
    pthread_mutex_lock(&vc->lock);
    if (kind == VK_COPY_FILL)
        memset(vc->staging.mapped, value, (size_t)(bytes < STAGING_BYTES ? bytes : STAGING_BYTES));
    for (size_t done = 0; done < bytes && !s;) {
        size_t n = bytes - done < STAGING_BYTES ? bytes - done : (size_t)STAGING_BYTES;
        if (kind == VK_COPY_UP)
            memcpy(vc->staging.mapped, (const char *)host + done, n);
        s = vk_begin(ctx, vc);
        if (s)
            break;
        VkBufferCopy region = {.srcOffset = kind == VK_COPY_DOWN ? offset + done : 0,
                               .dstOffset = kind == VK_COPY_DOWN ? 0 : offset + done, .size = n};
        if (kind == VK_COPY_DOWN)
            vc->vk.vkCmdCopyBuffer(vc->cmd, buffer, vc->staging.buffer, 1, &region);
        else
            vc->vk.vkCmdCopyBuffer(vc->cmd, vc->staging.buffer, buffer, 1, &region);
        if (kind == VK_COPY_DOWN)
            vk_barrier(vc, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT, VK_PIPELINE_STAGE_HOST_BIT,
                       VK_ACCESS_HOST_READ_BIT);
        s = vk_submit_wait(ctx, vc);
        if (!s && kind == VK_COPY_DOWN)
            memcpy((char *)host + done, vc->staging.mapped, n);
        done += n;
    }
    pthread_mutex_unlock(&vc->lock);
    return s;
}

/* ---------------------------------------------------------------- device */

/* The VkDevice with the features and extensions of vc->caps that qattn uses, and its queue. */
static qattn_status create_device(qattn_ctx *ctx, vk_ctx *vc)
{
    const vk_device_caps *c = vc->caps;
    const bool v12 = c->api_version >= VK_API_VERSION_1_2, v13 = c->api_version >= VK_API_VERSION_1_3;
    const char *exts[8];
    uint32_t n_ext = 0;
    VkPhysicalDevice16BitStorageFeatures f16s = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_16BIT_STORAGE_FEATURES,
                                                 .storageBuffer16BitAccess = VK_TRUE};
    VkPhysicalDeviceShaderFloat16Int8Features f16i8 = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES,
        .shaderFloat16 = c->float16, .shaderInt8 = c->int8};
    VkPhysicalDeviceSubgroupSizeControlFeatures fssc = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_SIZE_CONTROL_FEATURES,
        .subgroupSizeControl = c->subgroup_size_control, .computeFullSubgroups = c->full_subgroups};
    VkPhysicalDeviceShaderIntegerDotProductFeatures fdot = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_INTEGER_DOT_PRODUCT_FEATURES,
        .shaderIntegerDotProduct = c->int_dot};
    VkPhysicalDeviceCooperativeMatrixFeaturesKHR fcm = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_KHR, .cooperativeMatrix = VK_TRUE};
    VkPhysicalDeviceVulkanMemoryModelFeatures fvmm = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_MEMORY_MODEL_FEATURES, .vulkanMemoryModel = VK_TRUE,
        .vulkanMemoryModelDeviceScope = VK_TRUE};
    VkPhysicalDeviceFeatures2 f2 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2};
    f2.features.shaderFloat64 = c->float64;
    f2.features.shaderInt64 = c->int64;
    void **tail = &f2.pNext;
    *tail = &f16s;
    tail = &f16s.pNext;
    if (!v12 && c->ext_16bit_storage)
        exts[n_ext++] = VK_KHR_16BIT_STORAGE_EXTENSION_NAME;
    if (!v12 && c->ext_storage_buffer_class)
        exts[n_ext++] = VK_KHR_STORAGE_BUFFER_STORAGE_CLASS_EXTENSION_NAME;
    if ((c->float16 || c->int8) && (v12 || c->ext_float16_int8)) {
        *tail = &f16i8;
        tail = &f16i8.pNext;
        if (!v12)
            exts[n_ext++] = VK_KHR_SHADER_FLOAT16_INT8_EXTENSION_NAME;
    }
    if (c->subgroup_size_control && (v13 || c->ext_subgroup_size_control)) {
        *tail = &fssc;
        tail = &fssc.pNext;
        if (!v13)
            exts[n_ext++] = VK_EXT_SUBGROUP_SIZE_CONTROL_EXTENSION_NAME;
    }
    if (c->int_dot && (v13 || c->ext_int_dot)) {
        *tail = &fdot;
        tail = &fdot.pNext;
        if (!v13)
            exts[n_ext++] = VK_KHR_SHADER_INTEGER_DOT_PRODUCT_EXTENSION_NAME;
    }
    if (c->coopmat) {
        *tail = &fcm;
        tail = &fcm.pNext;
        exts[n_ext++] = VK_KHR_COOPERATIVE_MATRIX_EXTENSION_NAME;
    }
    if (c->memory_model && c->coopmat) { /* the cooperative-matrix SPIR-V uses the Vulkan memory model */
        *tail = &fvmm;
        tail = &fvmm.pNext;
    }
    float priority = 1.0f;
    VkDeviceQueueCreateInfo qi = {.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO,
                                  .queueFamilyIndex = c->queue_family, .queueCount = 1,
                                  .pQueuePriorities = &priority};
    VkDeviceCreateInfo di = {.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO, .pNext = &f2,
                             .queueCreateInfoCount = 1, .pQueueCreateInfos = &qi,
                             .enabledExtensionCount = n_ext, .ppEnabledExtensionNames = exts};
    qattn_status s = vk_check(ctx, vkCreateDevice(c->phys, &di, NULL, &vc->device), "vkCreateDevice");
    if (s)
        return s;
    volkLoadDeviceTable(&vc->vk, vc->device);
    vc->vk.vkGetDeviceQueue(vc->device, c->queue_family, 0, &vc->queue);
    return QATTN_OK;
}

/* Memory types: device-local for buffers; host-visible for staging and the status readback. */
static qattn_status choose_memory_types(qattn_ctx *ctx, vk_ctx *vc)
{
    const vk_device_caps *c = vc->caps;
    VkBufferCreateInfo probe_bi = {.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO, .size = 256,
                                   .usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT |
                                            VK_BUFFER_USAGE_TRANSFER_DST_BIT | VK_BUFFER_USAGE_UNIFORM_BUFFER_BIT};
    VkBuffer probe = VK_NULL_HANDLE;
    qattn_status s = vk_check(ctx, vc->vk.vkCreateBuffer(vc->device, &probe_bi, NULL, &probe), "vkCreateBuffer");
    if (s)
        return s;
    VkMemoryRequirements req;
    vc->vk.vkGetBufferMemoryRequirements(vc->device, probe, &req);
    vc->vk.vkDestroyBuffer(vc->device, probe, NULL);
    int local = find_memory_type(c->phys, req.memoryTypeBits, VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT, 0);
    if (local < 0)
        local = find_memory_type(c->phys, req.memoryTypeBits, 0, 0);
    const VkMemoryPropertyFlags hv = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
    int staging = find_memory_type(c->phys, req.memoryTypeBits, hv, VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT);
    if (staging < 0)
        staging = find_memory_type(c->phys, req.memoryTypeBits, hv, 0);
    int readback = find_memory_type(c->phys, req.memoryTypeBits, hv | VK_MEMORY_PROPERTY_HOST_CACHED_BIT, 0);
    if (readback < 0)
        readback = staging;
    if (local < 0 || staging < 0)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "Vulkan device %s has no %s memory type for storage buffers", c->props.deviceName,
                               local < 0 ? "device-local" : "host-visible coherent");
    vc->device_local_type = (uint32_t)local;
    vc->staging_type = (uint32_t)staging;
    vc->readback_type = (uint32_t)readback;
    return QATTN_OK;
}

qattn_status vk_device_open(qattn_ctx *ctx, vk_ctx *vc)
{
    qattn_status s = create_device(ctx, vc);
    if (!s)
        s = choose_memory_types(ctx, vc);
    if (s)
        return s;
    VkCommandPoolCreateInfo pi = {.sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO,
                                  .flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT,
                                  .queueFamilyIndex = vc->caps->queue_family};
    VkFenceCreateInfo fi = {.sType = VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
    s = vk_check(ctx, vc->vk.vkCreateCommandPool(vc->device, &pi, NULL, &vc->pool), "vkCreateCommandPool");
    if (!s) {
        VkCommandBufferAllocateInfo ai = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO,
                                          .commandPool = vc->pool, .level = VK_COMMAND_BUFFER_LEVEL_PRIMARY,
                                          .commandBufferCount = 1};
        s = vk_check(ctx, vc->vk.vkAllocateCommandBuffers(vc->device, &ai, &vc->cmd), "vkAllocateCommandBuffers");
    }
    if (!s)
        s = vk_check(ctx, vc->vk.vkCreateFence(vc->device, &fi, NULL, &vc->fence), "vkCreateFence");
    if (!s)
        s = vk_mem_create(ctx, vc, STAGING_BYTES, vc->staging_type, true, &vc->staging, "staging buffer");
    if (!s)
        s = vk_mem_create(ctx, vc, 256, vc->readback_type, true, &vc->readback, "status readback buffer");
    /* One layout for every attention kernel: 6 storage buffers and the plan's parameters. */
    if (!s)
        s = vk_layout_create(ctx, vc, VK_BINDINGS, VK_UNIFORM_BINDING, 64, "", &vc->set_layout, &vc->pipeline_layout);
    if (!s) {
        VkPipelineCacheCreateInfo ci = {.sType = VK_STRUCTURE_TYPE_PIPELINE_CACHE_CREATE_INFO};
        s = vk_check(ctx, vc->vk.vkCreatePipelineCache(vc->device, &ci, NULL, &vc->pipeline_cache),
                     "vkCreatePipelineCache");
    }
    return s;
}

void vk_device_close(vk_ctx *vc)
{
    for (int i = 0; i < vc->pipeline_count; i++)
        vc->vk.vkDestroyPipeline(vc->device, vc->pipelines[i].pipeline, NULL);
    free(vc->pipelines);
    if (vc->pipeline_cache)
        vc->vk.vkDestroyPipelineCache(vc->device, vc->pipeline_cache, NULL);
    if (vc->pipeline_layout)
        vc->vk.vkDestroyPipelineLayout(vc->device, vc->pipeline_layout, NULL);
    if (vc->set_layout)
        vc->vk.vkDestroyDescriptorSetLayout(vc->device, vc->set_layout, NULL);
    vk_mem_destroy(vc, &vc->staging);
    vk_mem_destroy(vc, &vc->readback);
    if (vc->fence)
        vc->vk.vkDestroyFence(vc->device, vc->fence, NULL);
    if (vc->pool)
        vc->vk.vkDestroyCommandPool(vc->device, vc->pool, NULL);
    vc->vk.vkDestroyDevice(vc->device, NULL);
}

/* ---------------------------------------------------------------- pipelines */

/* vk_pipeline_get under vc->lock. */
static qattn_status pipeline_get_locked(qattn_ctx *ctx, vk_ctx *vc, const vk_pipeline_key *key, VkPipeline *out)
{
    for (int i = 0; i < vc->pipeline_count; i++) {
        const vk_pipeline_key *k = &vc->pipelines[i].key;
        if (strcmp(k->shader, key->shader) == 0 && k->spec_count == key->spec_count &&
            k->required_subgroup == key->required_subgroup && k->paged == key->paged &&
            memcmp(k->spec, key->spec, key->spec_count * sizeof(uint32_t)) == 0) {
            *out = vc->pipelines[i].pipeline;
            return QATTN_OK;
        }
    }
    if (vc->pipeline_count == vc->pipeline_capacity) {
        int capacity = vc->pipeline_capacity ? 2 * vc->pipeline_capacity : 32;
        vk_pipeline *grown = realloc(vc->pipelines, (size_t)capacity * sizeof(*grown));
        if (!grown)
            return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the pipeline list");
        vc->pipelines = grown;
        vc->pipeline_capacity = capacity;
    }
    const vk_spirv *spv = vk_spirv_find(key->shader);
    if (!spv)
        return qattn_set_error(ctx, QATTN_ERR_INTERNAL, "shader %s is not built into this library", key->shader);
    VkShaderModuleCreateInfo mi = {.sType = VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO, .codeSize = spv->size,
                                   .pCode = spv->words};
    VkShaderModule module;
    qattn_status s = vk_check(ctx, vc->vk.vkCreateShaderModule(vc->device, &mi, NULL, &module), "vkCreateShaderModule");
    if (s)
        return s;
    VkSpecializationMapEntry entries[VK_MAX_SPEC];
    for (uint32_t i = 0; i < key->spec_count; i++)
        entries[i] = (VkSpecializationMapEntry){.constantID = i, .offset = i * 4, .size = 4};
    VkSpecializationInfo si = {.mapEntryCount = key->spec_count, .pMapEntries = entries,
                               .dataSize = key->spec_count * 4, .pData = key->spec};
    VkPipelineShaderStageRequiredSubgroupSizeCreateInfo rs = {
        .sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_REQUIRED_SUBGROUP_SIZE_CREATE_INFO,
        .requiredSubgroupSize = key->required_subgroup};
    VkComputePipelineCreateInfo ci = {
        .sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO,
        .stage = {.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO,
                  .pNext = key->required_subgroup ? &rs : NULL,
                  .flags = key->required_subgroup ? VK_PIPELINE_SHADER_STAGE_CREATE_REQUIRE_FULL_SUBGROUPS_BIT : 0,
                  .stage = VK_SHADER_STAGE_COMPUTE_BIT,
                  .module = module,
                  .pName = "main",
                  .pSpecializationInfo = &si},
        .layout = key->paged ? vc->paged_layout : vc->pipeline_layout,
    };
    VkPipeline pipeline;
    if (key->paged && !vc->paged_layout) {
        vc->vk.vkDestroyShaderModule(vc->device, module, NULL);
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "the paged KV cache is not available: %s",
                               vc->paged_unsupported);
    }
    s = vk_check(ctx, vc->vk.vkCreateComputePipelines(vc->device, vc->pipeline_cache, 1, &ci, NULL, &pipeline),
                 key->shader);
    vc->vk.vkDestroyShaderModule(vc->device, module, NULL);
    if (s)
        return s;
    if (the_instance.validation) { /* messages then name the shader */
        VkDebugUtilsObjectNameInfoEXT name = {.sType = VK_STRUCTURE_TYPE_DEBUG_UTILS_OBJECT_NAME_INFO_EXT,
                                              .objectType = VK_OBJECT_TYPE_PIPELINE,
                                              .objectHandle = (uint64_t)pipeline,
                                              .pObjectName = key->shader};
        vkSetDebugUtilsObjectNameEXT(vc->device, &name);
    }
    vc->pipelines[vc->pipeline_count].key = *key;
    vc->pipelines[vc->pipeline_count].pipeline = pipeline;
    vc->pipeline_count++;
    *out = pipeline;
    return vk_validation_check(ctx, vc); /* the layer checks the SPIR-V against the device here */
}

qattn_status vk_pipeline_get(qattn_ctx *ctx, vk_ctx *vc, const vk_pipeline_key *key, VkPipeline *out)
{
    pthread_mutex_lock(&vc->lock);
    qattn_status s = pipeline_get_locked(ctx, vc, key, out);
    pthread_mutex_unlock(&vc->lock);
    return s;
}

qattn_status vk_layout_create(qattn_ctx *ctx, vk_ctx *vc, uint32_t bindings, int uniform_at, uint32_t push_bytes,
                              const char *what, VkDescriptorSetLayout *set_layout, VkPipelineLayout *layout)
{
    VkDescriptorSetLayoutBinding b[VK_PAGED_BINDINGS > VK_BINDINGS ? VK_PAGED_BINDINGS : VK_BINDINGS];
    if (bindings > sizeof(b) / sizeof(b[0]))
        return qattn_set_error(ctx, QATTN_ERR_INTERNAL, "a descriptor set layout of %u bindings", bindings);
    for (uint32_t i = 0; i < bindings; i++)
        b[i] = (VkDescriptorSetLayoutBinding){
            .binding = i,
            .descriptorType = uniform_at >= 0 && i == (uint32_t)uniform_at ? VK_DESCRIPTOR_TYPE_UNIFORM_BUFFER
                                                                : VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
            .descriptorCount = 1,
            .stageFlags = VK_SHADER_STAGE_COMPUTE_BIT};
    VkDescriptorSetLayoutCreateInfo li = {.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO,
                                          .bindingCount = bindings, .pBindings = b};
    char call[64];
    snprintf(call, sizeof(call), "vkCreateDescriptorSetLayout%s", what);
    qattn_status s = vk_check(ctx, vc->vk.vkCreateDescriptorSetLayout(vc->device, &li, NULL, set_layout), call);
    if (s)
        return s;
    VkPushConstantRange pc = {.stageFlags = VK_SHADER_STAGE_COMPUTE_BIT, .offset = 0, .size = push_bytes};
    VkPipelineLayoutCreateInfo pi = {.sType = VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO, .setLayoutCount = 1,
                                     .pSetLayouts = set_layout, .pushConstantRangeCount = 1,
                                     .pPushConstantRanges = &pc};
    snprintf(call, sizeof(call), "vkCreatePipelineLayout%s", what);
    return vk_check(ctx, vc->vk.vkCreatePipelineLayout(vc->device, &pi, NULL, layout), call);
}

qattn_status vk_descriptor_set_create(qattn_ctx *ctx, vk_ctx *vc, VkDescriptorSetLayout layout,
                                      const VkDescriptorPoolSize *sizes, uint32_t size_count, const char *what,
                                      VkDescriptorPool *pool, VkDescriptorSet *set)
{
    VkDescriptorPoolCreateInfo pi = {.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO, .maxSets = 1,
                                     .poolSizeCount = size_count, .pPoolSizes = sizes};
    char call[64];
    snprintf(call, sizeof(call), "vkCreateDescriptorPool%s", what);
    qattn_status s = vk_check(ctx, vc->vk.vkCreateDescriptorPool(vc->device, &pi, NULL, pool), call);
    if (s)
        return s;
    VkDescriptorSetAllocateInfo ai = {.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO, .descriptorPool = *pool,
                                      .descriptorSetCount = 1, .pSetLayouts = &layout};
    snprintf(call, sizeof(call), "vkAllocateDescriptorSets%s", what);
    return vk_check(ctx, vc->vk.vkAllocateDescriptorSets(vc->device, &ai, set), call);
}

/* ---------------------------------------------------------------- recording */

qattn_status vk_begin(qattn_ctx *ctx, vk_ctx *vc)
{
    if (vc->lost)
        return qattn_set_error(ctx, QATTN_ERR_DEVICE_LOST, "the Vulkan device was lost earlier; the context is unusable");
    qattn_status s = vk_check(ctx, vc->vk.vkResetCommandBuffer(vc->cmd, 0), "vkResetCommandBuffer");
    if (s)
        return s;
    VkCommandBufferBeginInfo bi = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
                                   .flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT};
    return vk_check(ctx, vc->vk.vkBeginCommandBuffer(vc->cmd, &bi), "vkBeginCommandBuffer");
}

qattn_status vk_submit_wait(qattn_ctx *ctx, vk_ctx *vc)
{
    qattn_status s = vk_check(ctx, vc->vk.vkEndCommandBuffer(vc->cmd), "vkEndCommandBuffer");
    if (s)
        return s;
    s = vk_check(ctx, vc->vk.vkResetFences(vc->device, 1, &vc->fence), "vkResetFences");
    if (s)
        return s;
    VkSubmitInfo si = {.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO, .commandBufferCount = 1, .pCommandBuffers = &vc->cmd};
    s = vk_check(ctx, vc->vk.vkQueueSubmit(vc->queue, 1, &si, vc->fence), "vkQueueSubmit");
    if (s)
        return s;
    s = vk_check(ctx, vc->vk.vkWaitForFences(vc->device, 1, &vc->fence, VK_TRUE, UINT64_MAX), "vkWaitForFences");
    return s ? s : vk_validation_check(ctx, vc);
}

void vk_barrier(vk_ctx *vc, VkPipelineStageFlags src, VkAccessFlags src_access, VkPipelineStageFlags dst,
                VkAccessFlags dst_access)
{
    VkMemoryBarrier mb = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER, .srcAccessMask = src_access,
                          .dstAccessMask = dst_access};
    vc->vk.vkCmdPipelineBarrier(vc->cmd, src, dst, 0, 1, &mb, 0, NULL, 0, NULL);
}

void vk_compute_barrier(vk_ctx *vc, VkPipelineStageFlags src, VkAccessFlags src_access)
{
    vk_barrier(vc, src, src_access, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT,
               VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT);
}

void vk_record_dispatch(vk_ctx *vc, VkPipelineLayout layout, VkPipeline pipeline, const void *push,
                        uint32_t push_bytes, const uint32_t grid[2])
{
    vc->vk.vkCmdBindPipeline(vc->cmd, VK_PIPELINE_BIND_POINT_COMPUTE, pipeline);
    vc->vk.vkCmdPushConstants(vc->cmd, layout, VK_SHADER_STAGE_COMPUTE_BIT, 0, push_bytes, push);
    vc->vk.vkCmdDispatch(vc->cmd, grid[0], grid[1], 1);
}

/* ---------------------------------------------------------------- status words */

void vk_status_clear(vk_ctx *vc, VkBuffer buffer, VkDeviceSize at)
{
    vc->vk.vkCmdFillBuffer(vc->cmd, buffer, at, QATTN_STATUS_BYTES, 0);
    vk_compute_barrier(vc, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT);
}

void vk_read_status_back(vk_ctx *vc, VkBuffer src, VkDeviceSize at)
{
    vk_barrier(vc, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT, VK_PIPELINE_STAGE_TRANSFER_BIT,
               VK_ACCESS_TRANSFER_READ_BIT);
    VkBufferCopy region = {.srcOffset = at, .dstOffset = 0, .size = QATTN_STATUS_BYTES};
    vc->vk.vkCmdCopyBuffer(vc->cmd, src, vc->readback.buffer, 1, &region);
    vk_barrier(vc, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT, VK_PIPELINE_STAGE_HOST_BIT,
               VK_ACCESS_HOST_READ_BIT);
}

void vk_status_words(vk_ctx *vc, uint32_t words[QATTN_STATUS_WORDS])
{
    /* The readback memory may be non-coherent when it is host cached. */
    VkMappedMemoryRange range = {.sType = VK_STRUCTURE_TYPE_MAPPED_MEMORY_RANGE, .memory = vc->readback.memory,
                                 .offset = 0, .size = VK_WHOLE_SIZE};
    vc->vk.vkInvalidateMappedMemoryRanges(vc->device, 1, &range);
    memcpy(words, vc->readback.mapped, QATTN_STATUS_BYTES);
}

/* ---------------------------------------------------------------- grids and strides */

uint32_t vk_min_u32(uint64_t a, uint64_t b) { return (uint32_t)(a < b ? a : b); }

void vk_grid_of(uint64_t groups, uint32_t out[2])
{
    if (groups < 1)
        groups = 1;
    out[0] = vk_min_u32(groups, 65535);
    out[1] = vk_min_u32(qattn_ceil_div((int64_t)groups, out[0]), 65535);
}

uint32_t vk_stride32(int64_t extent, int64_t stride) { return extent > 1 ? (uint32_t)stride : 0u; }
