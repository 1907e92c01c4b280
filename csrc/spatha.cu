// Translation unit compiled at run time by venom_hf.kernels.nvrtc (NVRTC, no host code).
// The template instances to build are requested by name expression from Python
// (see venom_hf/kernels/configs.py); nothing here depends on torch.
#include "spatha.cuh"
