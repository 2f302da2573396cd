/*
 * The Vulkan backend's private types and the functions its files share.
 * Vulkan is loaded at run time through volk (Debian's libvulkan-volk-dev:
 * dlopen("libvulkan.so.1") and vkGetInstanceProcAddr); the library never
 * links libvulkan, and its volk symbols are hidden, so it coexists with a
 * host application's own Vulkan.
 *
 * One process-wide VkInstance (created on first use, kept until exit) serves
 * probing and every context; each context owns a VkDevice with its own
 * device-level function table.
 *
 * Files: vulkan_backend.c (the vtable, devices as qattn reports them,
 * contexts, buffers), vulkan_attention.c (dense plans and runs),
 * vulkan_paged.c (the paged KV cache), vulkan_runtime.c (instance, device,
 * memory, pipelines, command recording: what the others call; it calls none
 * of them).
 */
#ifndef QATTN_VULKAN_INTERNAL_H
#define QATTN_VULKAN_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include <volk.h>

#include "internal.h"

/* ------------------------------------------------------------------------
 * VK_KHR_cooperative_matrix arrived in the Vulkan headers 1.3.255; Debian
 * bookworm ships 1.3.239. These are the registry's values.
 * ------------------------------------------------------------------------ */
#ifndef VK_KHR_cooperative_matrix
#define VK_KHR_cooperative_matrix 1
#define VK_KHR_COOPERATIVE_MATRIX_EXTENSION_NAME "VK_KHR_cooperative_matrix"
#define VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_KHR ((VkStructureType)1000506000)
#define VK_STRUCTURE_TYPE_COOPERATIVE_MATRIX_PROPERTIES_KHR ((VkStructureType)1000506001)
typedef enum VkComponentTypeKHR {
    VK_COMPONENT_TYPE_FLOAT16_KHR = 0,
    VK_COMPONENT_TYPE_FLOAT32_KHR = 1,
    VK_COMPONENT_TYPE_FLOAT64_KHR = 2,
    VK_COMPONENT_TYPE_SINT8_KHR = 3,
    VK_COMPONENT_TYPE_SINT16_KHR = 4,
    VK_COMPONENT_TYPE_SINT32_KHR = 5,
    VK_COMPONENT_TYPE_SINT64_KHR = 6,
    VK_COMPONENT_TYPE_UINT8_KHR = 7,
    VK_COMPONENT_TYPE_UINT16_KHR = 8,
    VK_COMPONENT_TYPE_UINT32_KHR = 9,
    VK_COMPONENT_TYPE_UINT64_KHR = 10,
    VK_COMPONENT_TYPE_MAX_ENUM_KHR = 0x7FFFFFFF
} VkComponentTypeKHR;
typedef enum VkScopeKHR {
    VK_SCOPE_DEVICE_KHR = 1,
    VK_SCOPE_WORKGROUP_KHR = 2,
    VK_SCOPE_SUBGROUP_KHR = 3,
    VK_SCOPE_QUEUE_FAMILY_KHR = 5,
    VK_SCOPE_MAX_ENUM_KHR = 0x7FFFFFFF
} VkScopeKHR;
typedef struct VkCooperativeMatrixPropertiesKHR {
    VkStructureType sType;
    void *pNext;
    uint32_t MSize, NSize, KSize;
    VkComponentTypeKHR AType, BType, CType, ResultType;
    VkBool32 saturatingAccumulation;
    VkScopeKHR scope;
} VkCooperativeMatrixPropertiesKHR;
typedef struct VkPhysicalDeviceCooperativeMatrixFeaturesKHR {
    VkStructureType sType;
    void *pNext;
    VkBool32 cooperativeMatrix;
    VkBool32 cooperativeMatrixRobustBufferAccess;
} VkPhysicalDeviceCooperativeMatrixFeaturesKHR;
typedef VkResult(VKAPI_PTR *PFN_vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR)(
    VkPhysicalDevice physicalDevice, uint32_t *pPropertyCount, VkCooperativeMatrixPropertiesKHR *pProperties);
#endif

/* ------------------------------------------------------------ devices */

#define VK_MAX_DEVICES 16
#define VK_MAX_SHAPES 64

/* What one physical device offers, gathered once. */
typedef struct vk_device_caps {
    VkPhysicalDevice phys;
    VkPhysicalDeviceProperties props;
    uint32_t api_version;
    char driver_name[VK_MAX_DRIVER_NAME_SIZE], driver_info[VK_MAX_DRIVER_INFO_SIZE];
    uint32_t queue_family;   /* a family with compute; UINT32_MAX when none */
    uint64_t device_local_bytes;
    uint64_t max_alloc, max_buffer;
    uint32_t subgroup_size, min_subgroup, max_subgroup;
    bool subgroup_size_control, full_subgroups, required_size_in_compute, subgroup_shuffle, memory_model;
    bool storage16, storage8, float16, int8, float64, int64;
    bool int_dot, int_dot_accelerated;
    bool coopmat, coopmat2_nv, float8_ext, bfloat16_ext;
    bool ext_16bit_storage, ext_8bit_storage, ext_float16_int8, ext_subgroup_size_control, ext_int_dot;
    bool ext_storage_buffer_class; /* VK_KHR_storage_buffer_storage_class (core in 1.1) */
    uint32_t shape_count;
    VkCooperativeMatrixPropertiesKHR shapes[VK_MAX_SHAPES];
    /* The coopmat kernels' shapes, when enumerated (subgroup scope). */
    bool coopmat_f16_16x16x16; /* fp16 A/B, fp32 C/result */
    uint32_t compute_units;    /* SMs / CUs where an extension reports them (NV, AMD); else 0 */
    char unusable[QATTN_NAME_MAX]; /* why qattn cannot use it; "" when usable */
} vk_device_caps;

/* The process-wide instance and its usable devices (GPUs first). */
typedef struct vk_instance {
    VkInstance instance;
    uint32_t api_version;
    int device_count;
    vk_device_caps devices[VK_MAX_DEVICES];
    PFN_vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR get_coopmat_props;
    /* QATTN_VULKAN_VALIDATION=1 (read when the instance is made): the Khronos
     * validation layer with synchronization validation and a messenger that
     * counts what it reports; when it was asked for but could not be had,
     * why (contexts then fail with it). */
    bool validation;
    uint32_t validation_layer_version; /* the layer's specVersion */
    VkDebugUtilsMessengerEXT messenger;
    char validation_unavailable[QATTN_NAME_MAX];
} vk_instance;

/* ------------------------------------------------------------ pipelines */

/* The shaders compiled at build time (generated vk_spirv.c). */
typedef struct vk_spirv {
    const char *name;
    const uint32_t *words;
    size_t size; /* bytes */
} vk_spirv;
const vk_spirv *vk_spirv_find(const char *name); /* NULL when not built */

#define VK_BINDINGS 9 /* q, k, v, o, lse, workspace, params (uniform), a block layout's indptr and indices */
#define VK_UNIFORM_BINDING 6
#define VK_PAGED_BINDINGS 13 /* the paged KV cache's kernels: see shaders/paged_common.glsl */
#define VK_PAGED_PUSH_BYTES 128
#define VK_MAX_SPEC 16

typedef struct vk_pipeline_key {
    const char *shader;
    uint32_t spec[VK_MAX_SPEC];
    uint32_t spec_count;
    uint32_t required_subgroup; /* 0: any */
    bool paged;                 /* the paged pipeline layout (else the attention one) */
} vk_pipeline_key;

typedef struct vk_pipeline {
    vk_pipeline_key key;
    VkPipeline pipeline;
} vk_pipeline;

/* ------------------------------------------------------------ contexts */

typedef struct vk_mem {
    VkBuffer buffer;
    VkDeviceMemory memory;
    VkDeviceSize size;
    void *mapped; /* when host visible */
} vk_mem;

typedef struct vk_ctx {
    const vk_device_caps *caps;
    VkDevice device;
    struct VolkDeviceTable vk;
    VkQueue queue;
    VkCommandPool pool;
    VkCommandBuffer cmd;
    VkFence fence;
    uint32_t device_local_type, staging_type, readback_type;
    vk_mem staging;  /* upload/download/fill bounce buffer */
    vk_mem readback; /* 16 bytes: the status words of the last checked submission */
    VkDescriptorSetLayout set_layout;
    VkPipelineLayout pipeline_layout;
    VkPipelineCache pipeline_cache;
    vk_pipeline *pipelines; /* every variant made so far: plans keep their handles until the context goes */
    int pipeline_count, pipeline_capacity;
    /* The paged KV cache's kernels (vulkan_paged.c): their layout, a descriptor
     * set for appends and merges (plans own theirs), the append check's status. */
    VkDescriptorSetLayout paged_set_layout;
    VkPipelineLayout paged_layout;
    VkDescriptorPool paged_pool;
    VkDescriptorSet paged_set;
    vk_mem paged_status;
    char paged_unsupported[160]; /* why the device cannot run them; "" when it can */
    pthread_mutex_t lock; /* one submission at a time */
    bool use_coopmat;     /* QATTN_VULKAN_COOPMAT (default on) */
    bool lost;
    uint64_t validation_errors_seen; /* the process's validation error count at this context's last check */
} vk_ctx;

/* The buffer behind a qattn_buffer. */
typedef struct vk_buffer {
    vk_mem mem;
} vk_buffer;

/* The VkBuffer of a qattn buffer; VK_NULL_HANDLE for NULL. */
static inline VkBuffer vk_buffer_handle(const qattn_buffer *b)
{
    return b ? ((const vk_buffer *)b->impl)->mem.buffer : VK_NULL_HANDLE;
}

/* ------------------------------------------- vulkan_runtime.c: instance */

/* The instance, made on first use; NULL with reason (when given) on failure. */
const vk_instance *vk_instance_get(char *reason, size_t reason_len);

/* With QATTN_VULKAN_VALIDATION=1: QATTN_ERR_BACKEND when the validation layer
 * reported errors since vc's last check (each is also printed to stderr as it
 * comes), QATTN_OK otherwise. Submissions, pipeline creation and context
 * creation check; the count is process-wide, so a context may report what
 * another one caused, and the process exits with status 1 if any came. */
qattn_status vk_validation_check(qattn_ctx *ctx, vk_ctx *vc);

/* Appends formatted text to buf (a NUL-terminated string of capacity len), truncating. */
void vk_str_append(char *buf, size_t len, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* ------------------------------------- vulkan_runtime.c: device, memory */

/* Opens the device of vc->caps: the VkDevice with the features qattn uses, its
 * queue, memory types, command buffer and fence, the staging and readback
 * buffers, the attention pipeline layout and the pipeline cache. On failure
 * what was made stays for vk_device_close. */
qattn_status vk_device_open(qattn_ctx *ctx, vk_ctx *vc);
/* Destroys the pipelines and what vk_device_open made; the device is idle. */
void vk_device_close(vk_ctx *vc);

/* QATTN_OK for VK_SUCCESS; else the error for r (marking the device lost). */
qattn_status vk_check(qattn_ctx *ctx, VkResult r, const char *what);
qattn_status vk_mem_create(qattn_ctx *ctx, vk_ctx *vc, VkDeviceSize size, uint32_t type, bool map, vk_mem *out,
                           const char *what);
void vk_mem_destroy(vk_ctx *vc, vk_mem *m);

/* Host <-> device copies through the staging buffer, one chunk per submission
 * (takes vc->lock). VK_COPY_FILL writes `value` to every byte; host is unused. */
typedef enum { VK_COPY_UP, VK_COPY_DOWN, VK_COPY_FILL } vk_copy_kind;
qattn_status vk_staged_copy(qattn_ctx *ctx, vk_ctx *vc, VkBuffer buffer, size_t offset, void *host, size_t bytes,
                            vk_copy_kind kind, uint8_t value);

/* --------------------------------- vulkan_runtime.c: pipelines, layouts */

/* Creates (or finds) the compute pipeline for key (takes vc->lock). */
qattn_status vk_pipeline_get(qattn_ctx *ctx, vk_ctx *vc, const vk_pipeline_key *key, VkPipeline *out);

/* A descriptor set layout of `bindings` storage buffers (binding uniform_at a
 * uniform buffer instead, unless it is negative) and a pipeline layout with it and push_bytes of
 * push constants. `what` ends the calls' names in errors ("" or " (paged)"). */
qattn_status vk_layout_create(qattn_ctx *ctx, vk_ctx *vc, uint32_t bindings, int uniform_at, uint32_t push_bytes,
                              const char *what, VkDescriptorSetLayout *set_layout, VkPipelineLayout *layout);
/* A descriptor pool for one set of `layout` (its bindings counted by sizes),
 * and the set. `what` as for vk_layout_create. */
qattn_status vk_descriptor_set_create(qattn_ctx *ctx, vk_ctx *vc, VkDescriptorSetLayout layout,
                                      const VkDescriptorPoolSize *sizes, uint32_t size_count, const char *what,
                                      VkDescriptorPool *pool, VkDescriptorSet *set);

/* ---------------------------------------- vulkan_runtime.c: recording */

/* Begins recording vc->cmd; vk_submit_wait ends, submits and waits for it. Under vc->lock. */
qattn_status vk_begin(qattn_ctx *ctx, vk_ctx *vc);
qattn_status vk_submit_wait(qattn_ctx *ctx, vk_ctx *vc);

/* Records a memory barrier. */
void vk_barrier(vk_ctx *vc, VkPipelineStageFlags src, VkAccessFlags src_access, VkPipelineStageFlags dst,
                VkAccessFlags dst_access);
/* Records: what stage src wrote is visible to the compute shaders that follow. */
void vk_compute_barrier(vk_ctx *vc, VkPipelineStageFlags src, VkAccessFlags src_access);
/* Records a dispatch of pipeline over grid[0] x grid[1] work groups with push_bytes of push constants. */
void vk_record_dispatch(vk_ctx *vc, VkPipelineLayout layout, VkPipeline pipeline, const void *push,
                        uint32_t push_bytes, const uint32_t grid[2]);

/* Records: zeroes the status words (QATTN_STATUS_BYTES at `at` of buffer) for the compute shaders that follow. */
void vk_status_clear(vk_ctx *vc, VkBuffer buffer, VkDeviceSize at);
/* Records: the compute results' status words (at `at` of src) to the readback buffer. */
void vk_read_status_back(vk_ctx *vc, VkBuffer src, VkDeviceSize at);
/* After the submission completed: the status words the readback buffer holds. */
void vk_status_words(vk_ctx *vc, uint32_t words[QATTN_STATUS_WORDS]);

/* min(a, b) as 32 bits. */
uint32_t vk_min_u32(uint64_t a, uint64_t b);
/* A grid of at least `groups` work groups (up to 65535 x 65535); the kernels stride over the rest. */
void vk_grid_of(uint64_t groups, uint32_t out[2]);
/* A stride as the kernels take it: 32 bits, 0 for a dimension of extent 1 (it never moves). */
uint32_t vk_stride32(int64_t extent, int64_t stride);

/* --------------------------------------------------- vulkan_attention.c */

qattn_status vk_plan_init(qattn_ctx *ctx, qattn_plan *plan);
qattn_status vk_plan_finish(qattn_ctx *ctx, qattn_plan *plan);
void vk_plan_release(qattn_ctx *ctx, qattn_plan *plan);
qattn_status vk_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_run_bound *run);

/* ------------------------------------------- vulkan_paged.c: paged KV cache */

qattn_status vk_paged_ctx_init(qattn_ctx *ctx, vk_ctx *vc); /* after vk_device_open */
void vk_paged_ctx_release(vk_ctx *vc);
qattn_status vk_kv_append(qattn_ctx *ctx, const qattn_kv_append_args *args, const qattn_kv_cache_sizes *sizes);
qattn_status vk_paged_plan_init(qattn_ctx *ctx, qattn_plan *plan);
void vk_paged_plan_release(qattn_ctx *ctx, qattn_plan *plan);
qattn_status vk_paged_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *args);
qattn_status vk_merge_states(qattn_ctx *ctx, const qattn_merge_desc *desc, const qattn_merge_args *args);
/* Decode-time pruning: the page mass (the metadata and the selection run inside kv_append and paged_run). */
qattn_status vk_paged_page_mass(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *args,
                                qattn_buffer *mass, size_t mass_offset);

#endif
