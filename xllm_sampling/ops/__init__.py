"""The ops, one module per step (``xllm_sampling.ops.<step>``), each with one documented public
function. Import them from :mod:`xllm_sampling` (``xllm_sampling.logit_softmax``, ...): the
package loads them on first use. They live in this subpackage so that loading the module
``logit_softmax`` never replaces the function ``xllm_sampling.logit_softmax``."""
