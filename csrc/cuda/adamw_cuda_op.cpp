// noam_ext::fused_adamw_ for CUDA tensors: the checked entry every device shares
// (op_entry.h) in front of cuda::run_rows (adamw_cuda.cu). Registered here, in a
// file the C++ compiler builds like the CPU op's, rather than in the .cu: the argument
// checks (op_checks.h) are then compiled by one compiler with one set of flags for the
// whole .so. nvcc's host compilation of the same inline functions would be a second
// definition with different code, which the linker would silently choose between
// (scripts/audit_symbols.py).
#include <torch/library.h>

#include "../noam_ext/op_entry.h"

namespace noam_ext::cuda {

TORCH_LIBRARY_IMPL(noam_ext, CUDA, m) {
  m.impl("fused_adamw_", &fused_adamw_op<&run_rows>);
}

}  // namespace noam_ext::cuda
