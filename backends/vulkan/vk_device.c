/* The Vulkan backend: loader, instance, devices, contexts, buffers, pipelines. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "env.h"
#include "vk_internal.h"

/* ---------------------------------------------------------------- instance */

static pthread_once_t instance_once = PTHREAD_ONCE_INIT;
static vk_instance the_instance;
static char instance_error[QATTN_NAME_MAX];
static bool instance_ok;

/* Appends formatted text to buf (a NUL-terminated string of capacity len), truncating. */
static void str_append(char *buf, size_t len, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
static void str_append(char *buf, size_t len, const char *fmt, ...)
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

static const char *component_name(VkComponentTypeKHR t)
{
    static const char *const names[] = {"f16", "f32", "f64", "s8", "s16", "s32", "s64", "u8", "u16", "u32", "u64"};
    if ((unsigned)t == 1000141000u) /* VK_COMPONENT_TYPE_BFLOAT16_KHR */
        return "bf16";
    return (unsigned)t < sizeof(names) / sizeof(names[0]) ? names[t] : "?";
}

/* Gathers what one physical device offers and whether qattn can use it. */
static void gather_caps(const vk_instance *inst, vk_device_caps *c)
{
    VkPhysicalDevice pd = c->phys;
    vkGetPhysicalDeviceProperties(pd, &c->props);
    c->api_version = c->props.apiVersion;

    uint32_t n_ext = 0;
    vkEnumerateDeviceExtensionProperties(pd, NULL, &n_ext, NULL);
    VkExtensionProperties *exts = calloc(n_ext ? n_ext : 1, sizeof(*exts));
    if (!exts) {
        snprintf(c->unusable, sizeof(c->unusable), "out of host memory");
        return;
    }
    vkEnumerateDeviceExtensionProperties(pd, NULL, &n_ext, exts);
    const bool v12 = c->api_version >= VK_API_VERSION_1_2, v13 = c->api_version >= VK_API_VERSION_1_3;
    c->ext_16bit_storage = has_ext(exts, n_ext, VK_KHR_16BIT_STORAGE_EXTENSION_NAME);
    c->ext_8bit_storage = has_ext(exts, n_ext, VK_KHR_8BIT_STORAGE_EXTENSION_NAME);
    c->ext_float16_int8 = has_ext(exts, n_ext, VK_KHR_SHADER_FLOAT16_INT8_EXTENSION_NAME);
    c->ext_subgroup_size_control = has_ext(exts, n_ext, VK_EXT_SUBGROUP_SIZE_CONTROL_EXTENSION_NAME);
    c->ext_int_dot = has_ext(exts, n_ext, VK_KHR_SHADER_INTEGER_DOT_PRODUCT_EXTENSION_NAME);
    c->ext_storage_buffer_class = has_ext(exts, n_ext, VK_KHR_STORAGE_BUFFER_STORAGE_CLASS_EXTENSION_NAME);
    c->coopmat = has_ext(exts, n_ext, VK_KHR_COOPERATIVE_MATRIX_EXTENSION_NAME);
    c->coopmat2_nv = has_ext(exts, n_ext, "VK_NV_cooperative_matrix2");
    c->float8_ext = has_ext(exts, n_ext, "VK_EXT_shader_float8");
    c->bfloat16_ext = has_ext(exts, n_ext, "VK_KHR_shader_bfloat16");
    const bool sm_builtins = has_ext(exts, n_ext, VK_NV_SHADER_SM_BUILTINS_EXTENSION_NAME);
    const bool amd_cores = has_ext(exts, n_ext, VK_AMD_SHADER_CORE_PROPERTIES_EXTENSION_NAME);
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
    c->memory_model = fvmm.vulkanMemoryModel;

    /* Properties. */
    VkPhysicalDeviceSubgroupProperties sg = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES};
    VkPhysicalDeviceSubgroupSizeControlProperties sgc = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_SIZE_CONTROL_PROPERTIES};
    VkPhysicalDeviceMaintenance3Properties m3 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_3_PROPERTIES};
    VkPhysicalDeviceDriverProperties drv = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DRIVER_PROPERTIES};
    VkPhysicalDeviceShaderIntegerDotProductProperties dotp = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_INTEGER_DOT_PRODUCT_PROPERTIES};
    VkPhysicalDeviceProperties2 p2 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2};
    tail = &p2.pNext;
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
    vkGetPhysicalDeviceProperties2(pd, &p2);
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

    if (c->api_version < VK_API_VERSION_1_1)
        snprintf(c->unusable, sizeof(c->unusable), "Vulkan %u.%u device; qattn needs Vulkan 1.1",
                 VK_API_VERSION_MAJOR(c->api_version), VK_API_VERSION_MINOR(c->api_version));
    else if (c->queue_family == UINT32_MAX)
        snprintf(c->unusable, sizeof(c->unusable), "no queue family with compute");
    else if (!c->storage16)
        snprintf(c->unusable, sizeof(c->unusable), "no 16-bit storage buffer access (storageBuffer16BitAccess)");
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
    const char *ext_names[] = {"VK_KHR_portability_enumeration"};
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
        .flags = portability ? 0x00000001 /* VK_INSTANCE_CREATE_ENUMERATE_PORTABILITY_BIT_KHR */ : 0,
        .pApplicationInfo = &app,
        .enabledExtensionCount = portability ? 1 : 0,
        .ppEnabledExtensionNames = ext_names,
    };
    r = vkCreateInstance(&ci, NULL, &inst->instance);
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
    inst->get_coopmat_props = (PFN_vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR)vkGetInstanceProcAddr(
        inst->instance, "vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR");

    uint32_t n = 0;
    vkEnumeratePhysicalDevices(inst->instance, &n, NULL);
    VkPhysicalDevice pds[VK_MAX_DEVICES];
    if (n > VK_MAX_DEVICES)
        n = VK_MAX_DEVICES;
    if (n)
        vkEnumeratePhysicalDevices(inst->instance, &n, pds);
    if (n == 0) {
        snprintf(instance_error, sizeof(instance_error), "the Vulkan loader found no device (no driver installed?)");
        return;
    }
    /* Usable devices first, in the loader's order; qattn's index counts only those. */
    char why[QATTN_NAME_MAX] = "";
    for (uint32_t i = 0; i < n; i++) {
        vk_device_caps c = {.phys = pds[i]};
        gather_caps(inst, &c);
        if (c.unusable[0]) {
            str_append(why, sizeof(why), "%s%s: %s", why[0] ? "; " : "", c.props.deviceName, c.unusable);
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
        str_append(instance_error, sizeof(instance_error), "no usable Vulkan device (%s)", why);
        return;
    }
    instance_ok = true;
}

const vk_instance *vk_instance_get(char *reason, size_t reason_len)
{
    pthread_once(&instance_once, create_instance);
    if (!instance_ok) {
        if (reason)
        {
            reason[0] = '\0';
            str_append(reason, reason_len, "%s", instance_error);
        }
        return NULL;
    }
    return &the_instance;
}

static qattn_status vk_probe(int *device_count, char *reason, size_t reason_len)
{
    const vk_instance *inst = vk_instance_get(reason, reason_len);
    if (!inst) {
        *device_count = 0;
        return QATTN_ERR_UNAVAILABLE;
    }
    *device_count = inst->device_count;
    return QATTN_OK;
}

/* auto prefers the native CPU backend to a CPU implementation of Vulkan. */
static int vk_auto_score(void)
{
    const vk_instance *inst = vk_instance_get(NULL, 0);
    if (!inst || inst->device_count == 0)
        return 0;
    return inst->devices[0].props.deviceType == VK_PHYSICAL_DEVICE_TYPE_CPU ? 5 : 50; /* the cpu backend scores 10 */
}

static const char *vendor_name(uint32_t id)
{
    switch (id) {
    case 0x10de: return "NVIDIA";
    case 0x1002: return "AMD";
    case 0x8086: return "Intel";
    case 0x13b5: return "ARM";
    case 0x5143: return "Qualcomm";
    case 0x106b: return "Apple";
    case 0x10005: return "Mesa";
    default: return "unknown";
    }
}

static qattn_status vk_device_info(int device, qattn_device_info *info, char *reason, size_t reason_len)
{
    const vk_instance *inst = vk_instance_get(reason, reason_len);
    if (!inst)
        return QATTN_ERR_UNAVAILABLE;
    if (device < 0 || device >= inst->device_count) {
        snprintf(reason, reason_len, "device %d does not exist (%d usable Vulkan devices)", device, inst->device_count);
        return QATTN_ERR_NOT_FOUND;
    }
    const vk_device_caps *c = &inst->devices[device];
    memset(info, 0, sizeof(*info));
    snprintf(info->name, sizeof(info->name), "%s", c->props.deviceName);
    snprintf(info->vendor, sizeof(info->vendor), "%s (0x%04x)", vendor_name(c->props.vendorID), c->props.vendorID);
    snprintf(info->driver, sizeof(info->driver), "%s%s%s", c->driver_name[0] ? c->driver_name : "driver",
             c->driver_info[0] ? " " : "", c->driver_info);
    info->compute_units = (int)c->compute_units; /* 0: core Vulkan does not report it */
    info->memory_bytes = c->device_local_bytes;
    uint64_t max = c->max_buffer < c->max_alloc ? c->max_buffer : c->max_alloc;
    /* Shaders index buffers with 32-bit element indices; 4 GiB - 4 is the most they reach. */
    if (max > 0xfffffffcull)
        max = 0xfffffffcull;
    info->max_buffer_bytes = max;
    info->caps = QATTN_CAP_SUBGROUPS | QATTN_CAP_BF16; /* bf16: as storage (converted to fp32) */
    if (c->float16)
        info->caps |= QATTN_CAP_FP16;
    if (c->int_dot)
        info->caps |= QATTN_CAP_INT8_DOT;
    if (c->float8_ext)
        info->caps |= QATTN_CAP_FP8;
    if (c->coopmat)
        info->caps |= QATTN_CAP_MATRIX_UNITS;
    if (c->props.deviceType == VK_PHYSICAL_DEVICE_TYPE_CPU)
        info->caps |= QATTN_CAP_UNIFIED_MEMORY;
    info->precisions = (1u << QATTN_PRECISION_AUTO) | (1u << QATTN_PRECISION_EXACT) |
                       (1u << QATTN_PRECISION_INT8_FP16);

    char shapes[768] = "";
    for (uint32_t i = 0; i < c->shape_count; i++) {
        const VkCooperativeMatrixPropertiesKHR *s = &c->shapes[i];
        str_append(shapes, sizeof(shapes), "%s%ux%ux%u %sx%s+%s->%s%s%s", i ? ", " : "", s->MSize,
                 s->NSize, s->KSize, component_name(s->AType), component_name(s->BType), component_name(s->CType),
                 component_name(s->ResultType), s->saturatingAccumulation ? " sat" : "",
                 s->scope == VK_SCOPE_SUBGROUP_KHR ? "" : " (non-subgroup scope)");
    }
    const VkPhysicalDeviceLimits *lim = &c->props.limits;
    snprintf(info->details, sizeof(info->details),
             "Vulkan API %u.%u.%u, driver version 0x%x, device type %d\n"
             "subgroup size %u (min %u, max %u; size control %s, full subgroups %s)\n"
             "fp16 arithmetic %s, int8 arithmetic %s, fp64 %s, 16-bit storage %s, 8-bit storage %s\n"
             "integer dot product %s%s\n"
             "cooperative matrix (VK_KHR_cooperative_matrix): %s%s%s\n"
             "VK_NV_cooperative_matrix2 %s, VK_EXT_shader_float8 %s, VK_KHR_shader_bfloat16 %s\n"
             "maxComputeSharedMemorySize %u, maxStorageBufferRange %u, maxMemoryAllocationSize %llu\n"
             "kernels: scalar flash (any device)%s; paged KV cache (f16/bf16/fp8/int8 pages); FP8 modes not "
             "implemented on Vulkan\n",
             VK_API_VERSION_MAJOR(c->api_version), VK_API_VERSION_MINOR(c->api_version),
             VK_API_VERSION_PATCH(c->api_version), c->props.driverVersion, (int)c->props.deviceType,
             c->subgroup_size, c->min_subgroup, c->max_subgroup, c->subgroup_size_control ? "yes" : "no",
             c->full_subgroups ? "yes" : "no", c->float16 ? "yes" : "no", c->int8 ? "yes" : "no",
             c->float64 ? "yes" : "no", c->storage16 ? "yes" : "no", c->storage8 ? "yes" : "no",
             c->int_dot ? "yes" : "no", c->int_dot ? (c->int_dot_accelerated ? " (4x8 packed accelerated)" : " (not accelerated)") : "",
             c->coopmat ? "yes" : "no", c->shape_count ? "; shapes: " : "", shapes, c->coopmat2_nv ? "yes" : "no",
             c->float8_ext ? "yes" : "no", c->bfloat16_ext ? "yes" : "no", lim->maxComputeSharedMemorySize,
             lim->maxStorageBufferRange, (unsigned long long)c->max_alloc,
             c->coopmat_f16_16x16x16 ? ", cooperative-matrix flash (fp16 16x16x16)" : "");
    return QATTN_OK;
}

/* ---------------------------------------------------------------- helpers */

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
    return vk_check(ctx, vc->vk.vkWaitForFences(vc->device, 1, &vc->fence, VK_TRUE, UINT64_MAX), "vkWaitForFences");
}

/* ---------------------------------------------------------------- contexts */

#define STAGING_BYTES ((VkDeviceSize)16 << 20)

static void vk_ctx_release(qattn_ctx *ctx)
{
    vk_ctx *vc = ctx->impl;
    if (!vc)
        return;
    if (vc->device) {
        vc->vk.vkDeviceWaitIdle(vc->device);
        vk_paged_ctx_release(vc);
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
    pthread_mutex_destroy(&vc->lock);
    free(vc);
    ctx->impl = NULL;
}

static qattn_status vk_ctx_init(qattn_ctx *ctx)
{
    char reason[QATTN_NAME_MAX] = "";
    const vk_instance *inst = vk_instance_get(reason, sizeof(reason));
    if (!inst)
        return qattn_set_error(ctx, QATTN_ERR_UNAVAILABLE, "%s", reason);
    if (ctx->device < 0 || ctx->device >= inst->device_count)
        return qattn_set_error(ctx, QATTN_ERR_NOT_FOUND, "Vulkan device %d does not exist", ctx->device);
    vk_ctx *vc = calloc(1, sizeof(*vc));
    if (!vc)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the Vulkan context");
    if (pthread_mutex_init(&vc->lock, NULL)) {
        free(vc);
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "cannot create a mutex");
    }
    ctx->impl = vc;
    const vk_device_caps *c = vc->caps = &inst->devices[ctx->device];
    qattn_env env;
    qattn_env_read(&env, NULL);
    vc->use_coopmat = env.vulkan_coopmat;

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
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_MEMORY_MODEL_FEATURES, .vulkanMemoryModel = VK_TRUE};
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
    if (c->memory_model) { /* the cooperative-matrix SPIR-V uses the Vulkan memory model */
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
    if (s) {
        vk_ctx_release(ctx);
        return s;
    }
    volkLoadDeviceTable(&vc->vk, vc->device);
    vc->vk.vkGetDeviceQueue(vc->device, c->queue_family, 0, &vc->queue);

    /* Memory types: device-local for buffers; host-visible for staging. */
    VkBufferCreateInfo probe_bi = {.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO, .size = 256,
                                   .usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT |
                                            VK_BUFFER_USAGE_TRANSFER_DST_BIT | VK_BUFFER_USAGE_UNIFORM_BUFFER_BIT};
    VkBuffer probe = VK_NULL_HANDLE;
    s = vk_check(ctx, vc->vk.vkCreateBuffer(vc->device, &probe_bi, NULL, &probe), "vkCreateBuffer");
    if (s) {
        vk_ctx_release(ctx);
        return s;
    }
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
    if (local < 0 || staging < 0) {
        vk_ctx_release(ctx);
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "Vulkan device %s has no %s memory type for storage buffers", c->props.deviceName,
                               local < 0 ? "device-local" : "host-visible coherent");
    }
    vc->device_local_type = (uint32_t)local;
    vc->staging_type = (uint32_t)staging;
    vc->readback_type = (uint32_t)readback;

    VkCommandPoolCreateInfo pi = {.sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO,
                                  .flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT,
                                  .queueFamilyIndex = c->queue_family};
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

    /* One layout for every kernel: 6 storage buffers and the plan's parameters. */
    if (!s) {
        VkDescriptorSetLayoutBinding b[VK_BINDINGS];
        for (uint32_t i = 0; i < VK_BINDINGS; i++)
            b[i] = (VkDescriptorSetLayoutBinding){
                .binding = i,
                .descriptorType = i == VK_BINDINGS - 1 ? VK_DESCRIPTOR_TYPE_UNIFORM_BUFFER
                                                       : VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                .descriptorCount = 1,
                .stageFlags = VK_SHADER_STAGE_COMPUTE_BIT};
        VkDescriptorSetLayoutCreateInfo li = {.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO,
                                              .bindingCount = VK_BINDINGS, .pBindings = b};
        s = vk_check(ctx, vc->vk.vkCreateDescriptorSetLayout(vc->device, &li, NULL, &vc->set_layout),
                     "vkCreateDescriptorSetLayout");
    }
    if (!s) {
        VkPushConstantRange pc = {.stageFlags = VK_SHADER_STAGE_COMPUTE_BIT, .offset = 0, .size = 64};
        VkPipelineLayoutCreateInfo li = {.sType = VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO,
                                         .setLayoutCount = 1, .pSetLayouts = &vc->set_layout,
                                         .pushConstantRangeCount = 1, .pPushConstantRanges = &pc};
        s = vk_check(ctx, vc->vk.vkCreatePipelineLayout(vc->device, &li, NULL, &vc->pipeline_layout),
                     "vkCreatePipelineLayout");
    }
    if (!s) {
        VkPipelineCacheCreateInfo ci = {.sType = VK_STRUCTURE_TYPE_PIPELINE_CACHE_CREATE_INFO};
        s = vk_check(ctx, vc->vk.vkCreatePipelineCache(vc->device, &ci, NULL, &vc->pipeline_cache),
                     "vkCreatePipelineCache");
    }
    if (!s)
        s = vk_paged_ctx_init(ctx, vc);
    if (s) {
        vk_ctx_release(ctx);
        return s;
    }
    return QATTN_OK;
}

static qattn_status vk_synchronize(qattn_ctx *ctx)
{
    /* qattn_run and the copies wait for their own submissions: nothing is in flight. */
    vk_ctx *vc = ctx->impl;
    if (vc->lost)
        return qattn_set_error(ctx, QATTN_ERR_DEVICE_LOST, "the Vulkan device was lost; the context is unusable");
    return QATTN_OK;
}

/* ---------------------------------------------------------------- pipelines */

qattn_status vk_pipeline_get(qattn_ctx *ctx, vk_ctx *vc, const vk_pipeline_key *key, VkPipeline *out)
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
    vc->pipelines[vc->pipeline_count].key = *key;
    vc->pipelines[vc->pipeline_count].pipeline = pipeline;
    vc->pipeline_count++;
    *out = pipeline;
    return QATTN_OK;
}

/* ---------------------------------------------------------------- buffers */

static qattn_status vk_buffer_alloc(qattn_ctx *ctx, qattn_buffer *buf)
{
    vk_ctx *vc = ctx->impl;
    vk_buffer *b = calloc(1, sizeof(*b));
    if (!b)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for a buffer");
    /* Round up to 16 bytes so vector loads at the end stay inside. */
    VkDeviceSize size = ((VkDeviceSize)buf->size + 15) & ~(VkDeviceSize)15;
    qattn_status s = vk_mem_create(ctx, vc, size, vc->device_local_type, false, &b->mem, "buffer allocation");
    if (s) {
        free(b);
        return s;
    }
    buf->impl = b;
    buf->host = NULL;
    return QATTN_OK;
}

static void vk_buffer_release(qattn_ctx *ctx, qattn_buffer *buf)
{
    vk_ctx *vc = ctx->impl;
    vk_buffer *b = buf->impl;
    if (!b)
        return;
    vk_mem_destroy(vc, &b->mem);
    free(b);
}

/* Host <-> device copies through the staging buffer, one chunk per submission. */
typedef enum { COPY_UP, COPY_DOWN, COPY_FILL } copy_kind;

static qattn_status staged_copy(qattn_ctx *ctx, const qattn_buffer *buf, size_t offset, void *host, size_t bytes,
                                copy_kind kind, uint8_t value)
{
    vk_ctx *vc = ctx->impl;
    vk_buffer *b = buf->impl;
    qattn_status s = QATTN_OK;
    pthread_mutex_lock(&vc->lock);
    if (kind == COPY_FILL && offset % 4 == 0 && (bytes % 4 == 0 || offset + bytes == buf->size)) {
        /* vkCmdFillBuffer writes whole words; the allocation is rounded up to 16 bytes. */
        uint32_t word = value * 0x01010101u;
        VkDeviceSize n = (bytes + 3) & ~(size_t)3;
        s = vk_begin(ctx, vc);
        if (!s) {
            vc->vk.vkCmdFillBuffer(vc->cmd, b->mem.buffer, offset, n, word);
            s = vk_submit_wait(ctx, vc);
        }
        pthread_mutex_unlock(&vc->lock);
        return s;
    }
    if (kind == COPY_FILL)
        memset(vc->staging.mapped, value, (size_t)(bytes < STAGING_BYTES ? bytes : STAGING_BYTES));
    for (size_t done = 0; done < bytes && !s;) {
        size_t n = bytes - done < STAGING_BYTES ? bytes - done : (size_t)STAGING_BYTES;
        if (kind == COPY_UP)
            memcpy(vc->staging.mapped, (const char *)host + done, n);
        s = vk_begin(ctx, vc);
        if (s)
            break;
        VkBufferCopy region = {.srcOffset = kind == COPY_DOWN ? offset + done : 0,
                               .dstOffset = kind == COPY_DOWN ? 0 : offset + done, .size = n};
        if (kind == COPY_DOWN)
            vc->vk.vkCmdCopyBuffer(vc->cmd, b->mem.buffer, vc->staging.buffer, 1, &region);
        else
            vc->vk.vkCmdCopyBuffer(vc->cmd, vc->staging.buffer, b->mem.buffer, 1, &region);
        if (kind == COPY_DOWN) {
            VkMemoryBarrier mb = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER,
                                  .srcAccessMask = VK_ACCESS_TRANSFER_WRITE_BIT, .dstAccessMask = VK_ACCESS_HOST_READ_BIT};
            vc->vk.vkCmdPipelineBarrier(vc->cmd, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_PIPELINE_STAGE_HOST_BIT, 0, 1, &mb,
                                        0, NULL, 0, NULL);
        }
        s = vk_submit_wait(ctx, vc);
        if (!s && kind == COPY_DOWN)
            memcpy((char *)host + done, vc->staging.mapped, n);
        done += n;
    }
    pthread_mutex_unlock(&vc->lock);
    return s;
}

static qattn_status vk_buffer_upload(qattn_ctx *ctx, qattn_buffer *buf, size_t offset, const void *src, size_t bytes)
{
    return staged_copy(ctx, buf, offset, (void *)src, bytes, COPY_UP, 0);
}

static qattn_status vk_buffer_download(qattn_ctx *ctx, const qattn_buffer *buf, size_t offset, void *dst, size_t bytes)
{
    return staged_copy(ctx, buf, offset, dst, bytes, COPY_DOWN, 0);
}

static qattn_status vk_buffer_fill(qattn_ctx *ctx, qattn_buffer *buf, size_t offset, size_t bytes, uint8_t value)
{
    return staged_copy(ctx, buf, offset, NULL, bytes, COPY_FILL, value);
}

static qattn_status vk_buffer_wrap(qattn_ctx *ctx, qattn_buffer *buf, void *native)
{
    (void)buf;
    (void)native;
    return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                           "the vulkan backend cannot wrap a caller's VkBuffer yet: its VkDevice is private to the "
                           "qattn context; copy through qattn_buffer_upload instead");
}

const qattn_backend_iface qattn_backend_vulkan = {
    .api_version = QATTN_BACKEND_API_VERSION,
    .name = "vulkan",
    .score = 50,
    .auto_score = vk_auto_score,
    .probe = vk_probe,
    .device_info = vk_device_info,
    .ctx_init = vk_ctx_init,
    .ctx_release = vk_ctx_release,
    .synchronize = vk_synchronize,
    .buffer_alloc = vk_buffer_alloc,
    .buffer_wrap = vk_buffer_wrap,
    .buffer_release = vk_buffer_release,
    .buffer_upload = vk_buffer_upload,
    .buffer_download = vk_buffer_download,
    .buffer_fill = vk_buffer_fill,
    .plan_init = vk_plan_init,
    .plan_finish = vk_plan_finish,
    .plan_release = vk_plan_release,
    .run = vk_run,
    .tensor_alignment = 16,
    .kv_append = vk_kv_append,
    .paged_plan_init = vk_paged_plan_init,
    .paged_plan_release = vk_paged_plan_release,
    .paged_run = vk_paged_run,
    .merge_states = vk_merge_states,
};
