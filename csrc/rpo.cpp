// The one schema registration of the rpo ops (torch.ops.rpo.*). Kernels: cpu/ and cuda/; autograd and the
// fake (meta) kernel are registered from Python in rpo/ops/contrast.py.
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
  // w.r.t. chosen and rejected (empty when compute_grad is false). weighting: 0 embedding, 1 uniform,
  // 2 diagonal (diagonal of row i is column diag_offset + i), 3 none; normalization: 0 row, 1 mean.
  m.def(
      "contrast_loss_terms(Tensor chosen, Tensor rejected, Tensor? chosen_emb, Tensor? rejected_emb, float beta, "
      "float margin, float tau, float alpha, int weighting, int normalization, int diag_offset, float loss_scale, "
      "bool compute_grad) -> (Tensor, Tensor, Tensor)");
  // Debug: distinct OS threads that ran row chunks in the last CPU call (the threading test reads it).
  m.def("_cpu_threads_used_last_call() -> int", &rpo::ops::cpu_threads_used_last_call);
}
