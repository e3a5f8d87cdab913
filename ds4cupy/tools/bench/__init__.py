"""Measure model load, prefill and decode speed: N runs, median and spread, a table, JSON and CSV.

    ds4cupy bench -m MODEL.gguf [--pp 512,2048,8192] [--tg 128] [--depth 0,4096,16384] [--runs 3]
    ds4cupy bench --synthetic flash [--experts q2|q4] [--layers N]      # random weights made on the GPU, no file
    ds4cupy bench --server http://127.0.0.1:8000 [...]                  # the same through the OpenAI endpoint

Method (BENCHMARKS.md has the long form):
- Each run: drop the model file's page cache (/proc/sys/vm/drop_caches when permitted, else posix_fadvise
  DONTNEED on the file; a warning when neither works), load the model (timed), one untimed warm-up (8-token prefill,
  2 decode steps: kernel modules load on first use), then the tests on one session (reset between tests).
- Clock: time.perf_counter on the host, after cudaDeviceSynchronize when on the GPU.
- Prefill ppL: prefill of L fixed token ids (seeded, control tokens excluded), then the greedy first token:
  tokens/s = L / time; TTFT = the same time.
- Decode tgN at depth D: prefill of max(D, 1) tokens (its time is the TTFT at that depth), then N decode steps, each
  feeding the greedy token (argmax of the logits, EOS excluded) of the step before. With t0 the end of the prefill and
  t1..tN the ends of the steps: steady state = (N-1) / (tN - t1) (llama-benchy), average = N / (tN - t0) (ds4-bench:
  every decode step counted, the first too).
- Decode path: `decode_top` (default, `--decode-path top`, where the session computes the candidates on the device,
  `candidates_on_device`: the candidate set, greedy = its first id that is not EOS; the candidates are computed inside
  the decode graph and ~8 KB come back) or `decode` (`logits`, and `top` on a session without device candidates: the
  whole row comes back and argmax runs on the host).
- Host time per decoded token (cuda backend): for each step, the wall time of the decode call plus the token choice,
  minus the GPU time between two CUDA events the session records on its stream just before and just after the step's
  kernels (the graph replay); what is left is the Python, the uploads (token id, temperature), the launch, the
  download and the wake-up after the synchronize: the time the GPU idles between steps. Median over the steps.
- Bytes read per decoded token: weights (info.decode_bytes_per_token: dense tensors, n_expert_used of n_expert
  experts per layer, one embedding row, the head) + KV rows attention reads at that position (window ring, compressed
  rows of HCA layers, the indexer's rows and the top-k selected rows of CSA layers, compressor state), averaged over
  the decoded positions. Achieved GB/s = bytes per token x steady-state tokens/s; the roofline fraction divides it by
  the device's read bandwidth measured in the same run (memory.arena.stream_read over a large buffer).
- Peak GPU memory: the largest rise of (total - free) of cudaMemGetInfo over the run, from before the model loads.
- Server mode: streaming chat completions (model alias deepseek-chat: no thinking, temperature 0); TTFT = arrival of
  the first token's chunk; decode rates from chunk arrival times with the same formulas (the first chunk's token comes
  from the prefill, max_tokens = N + 1); prompt sizes from the endpoint's usage (prompt_tokens - cached_tokens).
Every number printed is measured in the run that prints it.
"""
from .cli import add_arguments, main

__all__ = ["add_arguments", "main"]
