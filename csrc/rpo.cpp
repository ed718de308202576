// The one schema registration of the rpo ops (torch.ops.rpo.*). Backend kernels: cpu/ and cuda/ (through the
// shared entry of contrast_loss.cpp); autograd and the fake (meta) kernel are registered from Python in
// rpo/ops/_extension.py.
#include <Python.h>
#include <torch/library.h>

#include "contrast_loss.h"

// `import rpo._C` loads this library, which runs the registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(rpo, m) {
  // loss = loss_scale * sum_{i,j} softplus(-w_ij (beta (chosen_i - rejected_j) - margin)) and its gradients
  // w.r.t. chosen and rejected (empty when compute_grad is false). weighting: "embedding", "uniform",
  // "diagonal" (the diagonal of row i is column diag_offset + i) or "none"; weight_normalization: "row" or
  // "mean". Cosines of the embeddings in full float32 (float64 for float64 scores) whatever the TF32 setting.
  m.def(
      "contrast_loss_and_grads(Tensor chosen, Tensor rejected, Tensor? chosen_emb, Tensor? rejected_emb, "
      "float beta, float margin, float tau, float alpha, str weighting, str weight_normalization, int diag_offset, "
      "float loss_scale, bool compute_grad) -> (Tensor, Tensor, Tensor)");
  // Debug: distinct OS threads that ran row chunks in the last CPU call (the threading test reads it).
  m.def("_cpu_threads_used_last_call() -> int", &rpo::ops::cpu_threads_used_last_call);
}
