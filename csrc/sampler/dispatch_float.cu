// Step sampler: the launches for float logits (dispatch.cuh), built apart from the other types.
#include "sampler/dispatch.cuh"

template void xllm::sampler::dispatch<float>(const torch::Tensor&, xllm::sampler::Args, bool, bool, bool);
