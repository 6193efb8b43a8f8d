// Step sampler: the launches for __half logits (dispatch.cuh), built apart from the other types.
#include "sampler/dispatch.cuh"

template void xllm::sampler::dispatch<__half>(const torch::Tensor&, xllm::sampler::Args, bool, bool, bool);
