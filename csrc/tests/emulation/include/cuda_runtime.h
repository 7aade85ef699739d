// Stands in for the CUDA runtime header in the CPU emulation (see ../cuda_emulation.h).
#pragma once
#include "../cuda_emulation.h"
