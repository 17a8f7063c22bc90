// Shared helpers of the torch-facing C++ code (CPU kernels and CUDA glue).
#pragma once

#define FQGAN_STR_(x) #x
#define FQGAN_STR(x) FQGAN_STR_(x)

#ifdef FQGAN_SOURCES_DIGEST
#define FQGAN_DIGEST_STRING FQGAN_STR(FQGAN_SOURCES_DIGEST)
#else
#define FQGAN_DIGEST_STRING ""
#endif
