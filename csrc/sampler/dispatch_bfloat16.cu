// Step sampler: the launches for __nv_bfloat16 logits (dispatch.cuh), built apart from the other types.
#include "sampler/dispatch.cuh"

template void xllm::sampler::dispatch<__nv_bfloat16>(const torch::Tensor&, xllm::sampler::Args, bool, bool, bool);
