// pdl.cuh: programmatic dependent launch (PDL, sm_90+), the first statement of every kernel.
//
// DS4_PDL_ENTRY(): griddepcontrol.wait blocks until every grid this one depends on has completed and its memory
// writes are visible, then griddepcontrol.launch_dependents lets the next kernel of the stream (or graph) be launched
// and its CTAs scheduled while this one runs. A kernel launched without the PDL attribute (the default, switch PDL
// off: engines/cuda/launch.py) has no programmatic dependency, so both instructions return at once and nothing
// changes. With the attribute, waiting before any global memory access keeps every kernel's reads and writes after
// all of its predecessor's, exactly as in plain stream order; letting the dependents launch right after the wait is
// safe for the same reason (each of them waits for this grid's completion before touching memory).
// Below sm_90 (no griddepcontrol) the macro is empty.
#pragma once

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define DS4_PDL_ENTRY() asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")
#else
#define DS4_PDL_ENTRY() ((void)0)
#endif
