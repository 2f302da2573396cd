/*
 * The Vulkan backend's private types. Vulkan is loaded at run time through
 * volk (Debian's libvulkan-volk-dev: dlopen("libvulkan.so.1") and
 * vkGetInstanceProcAddr); the library never links libvulkan, and its volk
 * symbols are hidden, so it coexists with a host application's own Vulkan.
 *
 * One process-wide VkInstance (created on first use, kept until exit) serves
 * probing and every context; each context owns a VkDevice with its own
 * device-level function table.
 */
#ifndef QATTN_VK_INTERNAL_H
#define QATTN_VK_INTERNAL_H

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

/* The process-wide instance and its devices. NULL with reason on failure. */
typedef struct vk_instance {
    VkInstance instance;
    uint32_t api_version;
    int device_count;
    vk_device_caps devices[VK_MAX_DEVICES];
    PFN_vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR get_coopmat_props;
} vk_instance;

const vk_instance *vk_instance_get(char *reason, size_t reason_len);

/* ------------------------------------------------------------ pipelines */

/* The shaders compiled at build time (generated vk_spirv.c). */
typedef struct vk_spirv {
    const char *name;
    const uint32_t *words;
    size_t size; /* bytes */
} vk_spirv;
const vk_spirv *vk_spirv_find(const char *name); /* NULL when not built */

#define VK_BINDINGS 7 /* q, k, v, o, lse, workspace, params */
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
    bool device_local_is_host_visible;
    vk_mem staging;  /* upload/download/fill bounce buffer */
    vk_mem readback; /* 16 bytes: the finite-check status word */
    VkDescriptorSetLayout set_layout;
    VkPipelineLayout pipeline_layout;
    VkPipelineCache pipeline_cache;
    vk_pipeline *pipelines; /* every variant made so far: plans keep their handles until the context goes */
    int pipeline_count, pipeline_capacity;
    /* The paged KV cache's kernels (vk_paged.c): their layout, a descriptor set
     * for appends and merges (plans own theirs), the append check's status. */
    VkDescriptorSetLayout paged_set_layout;
    VkPipelineLayout paged_layout;
    VkDescriptorPool paged_pool;
    VkDescriptorSet paged_set;
    vk_mem paged_status;
    char paged_unsupported[160]; /* why the device cannot run them; "" when it can */
    pthread_mutex_t lock; /* one submission at a time */
    bool use_coopmat;     /* QATTN_VULKAN_COOPMAT (default on) */
    bool lost;
} vk_ctx;

/* The buffer behind a qattn_buffer. */
typedef struct vk_buffer {
    vk_mem mem;
} vk_buffer;

qattn_status vk_check(qattn_ctx *ctx, VkResult r, const char *what);
qattn_status vk_mem_create(qattn_ctx *ctx, vk_ctx *vc, VkDeviceSize size, uint32_t type, bool map, vk_mem *out,
                           const char *what);
void vk_mem_destroy(vk_ctx *vc, vk_mem *m);
/* Creates (or finds) the compute pipeline for key; under vc->lock. */
qattn_status vk_pipeline_get(qattn_ctx *ctx, vk_ctx *vc, const vk_pipeline_key *key, VkPipeline *out);
/* Begins recording vc->cmd; vk_submit_wait ends, submits and waits for it. */
qattn_status vk_begin(qattn_ctx *ctx, vk_ctx *vc);
qattn_status vk_submit_wait(qattn_ctx *ctx, vk_ctx *vc);

/* vk_attention.c */
qattn_status vk_plan_init(qattn_ctx *ctx, qattn_plan *plan);
qattn_status vk_plan_finish(qattn_ctx *ctx, qattn_plan *plan);
void vk_plan_release(qattn_ctx *ctx, qattn_plan *plan);
qattn_status vk_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_run_bound *run);

/* vk_paged.c: the paged KV cache */
qattn_status vk_paged_ctx_init(qattn_ctx *ctx, vk_ctx *vc); /* after the attention layout exists */
void vk_paged_ctx_release(vk_ctx *vc);
qattn_status vk_kv_append(qattn_ctx *ctx, const qattn_kv_append_args *args, const qattn_kv_cache_sizes *sizes);
qattn_status vk_paged_plan_init(qattn_ctx *ctx, qattn_plan *plan);
void vk_paged_plan_release(qattn_ctx *ctx, qattn_plan *plan);
qattn_status vk_paged_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *args);
qattn_status vk_merge_states(qattn_ctx *ctx, const qattn_merge_desc *desc, const qattn_merge_args *args);

#endif
