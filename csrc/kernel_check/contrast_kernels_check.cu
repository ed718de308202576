// Torch-free compile check of the CUDA kernels (CMake option RPO_KERNEL_CHECK_ONLY, `make kernel-check`):
// instantiates every kernel/launcher the torch binding uses, for each score dtype, so nvcc compiles the
// device code for sm_90 without libtorch. Nothing here runs.
#include <cuda_bf16.h>

#include "kernels/contrast_cuda_kernels.cuh"

namespace rpo {
namespace kernels {
namespace cuda {

template cudaError_t launch_softmax_rows<float>(float*, int64_t, int64_t, const float*, const float*, float, float,
                                                float*, cudaStream_t);
template cudaError_t launch_softmax_rows<double>(double*, int64_t, int64_t, const double*, const double*, double,
                                                 double, double*, cudaStream_t);

template cudaError_t launch_pair_pass<float, float>(PairPassParams<float, float>, bool, cudaStream_t);
template cudaError_t launch_pair_pass<double, double>(PairPassParams<double, double>, bool, cudaStream_t);
template cudaError_t launch_pair_pass<__nv_bfloat16, float>(PairPassParams<__nv_bfloat16, float>, bool,
                                                            cudaStream_t);

}  // namespace cuda
}  // namespace kernels
}  // namespace rpo

// The weight parameters are built on the host by the binding; instantiate them here as well.
template rpo::kernels::WeightParams<float> rpo::kernels::make_weight_params<float>(int64_t, int64_t, int64_t, double);
template rpo::kernels::WeightParams<double> rpo::kernels::make_weight_params<double>(int64_t, int64_t, int64_t,
                                                                                     double);
