"""The paper's figures the benchmark is set beside, copied from its Tables 1 and 3
(/work/shared/paper/sentencevae-paper.txt; PyTorch on RTX 4090 / A100 GPUs)."""
from __future__ import annotations

# Table 1: SentenceVAEs on the validation set: (hidden size, blocks) -> (loss, PPL), as printed
TABLE1 = {
    (768, 1): ("1.339", "3.605"), (768, 2): ("1.019", "2.588"), (768, 4): ("0.5598", "1.649"),
    (1024, 1): ("0.9266", "2.406"), (1024, 2): ("0.6610", "1.845"), (1024, 4): ("0.3704", "1.384"),
    (2048, 1): ("0.5165", "1.622"), (2048, 2): ("0.2845", "1.292"), (2048, 4): ("0.1270", "1.115"),
}

# Table 3: OPT vs SLLM. PPL, mean output throughput (tokens/s), mean GPU memory (KB per token).
# The OPT columns are given once per base model.
TABLE3 = {
    "SLLM-125M-H1": {"params": "214M", "opt_ppl": 26.75, "sllm_ppl": 31.68, "opt_tps": 214.57, "sllm_tps": 652.78,
                     "opt_kb": 73.15, "sllm_kb": 12.03, "tps_delta": "+204.2%", "kb_delta": "-83.6%"},
    "SLLM-125M-H2": {"params": "226M", "opt_ppl": 26.75, "sllm_ppl": 44.60, "opt_tps": 214.57, "sllm_tps": 539.80,
                     "opt_kb": 73.15, "sllm_kb": 7.08, "tps_delta": "+151.6%", "kb_delta": "-90.3%"},
    "SLLM-125M-H4": {"params": "250M", "opt_ppl": 26.75, "sllm_ppl": 14.32, "opt_tps": 214.57, "sllm_tps": 332.12,
                     "opt_kb": 73.15, "sllm_kb": 10.00, "tps_delta": "+54.8%", "kb_delta": "-86.3%"},
    "SLLM-350M-H1": {"params": "429M", "opt_ppl": 25.18, "sllm_ppl": 24.84, "opt_tps": 144.33, "sllm_tps": 481.39,
                     "opt_kb": 197.59, "sllm_kb": 29.98, "tps_delta": "+233.5%", "kb_delta": "-84.8%"},
    "SLLM-350M-H2": {"params": "450M", "opt_ppl": 25.18, "sllm_ppl": 14.81, "opt_tps": 144.33, "sllm_tps": 442.23,
                     "opt_kb": 197.59, "sllm_kb": 26.78, "tps_delta": "+206.4%", "kb_delta": "-86.4%"},
    "SLLM-350M-H4": {"params": "492M", "opt_ppl": 25.18, "sllm_ppl": 10.17, "opt_tps": 144.33, "sllm_tps": 315.61,
                     "opt_kb": 197.59, "sllm_kb": 17.73, "tps_delta": "+118.7%", "kb_delta": "-91.0%"},
    "SLLM-1.3B-H1": {"params": "1.61B", "opt_ppl": 15.95, "sllm_ppl": 8.76, "opt_tps": 119.07, "sllm_tps": 479.71,
                     "opt_kb": 400.01, "sllm_kb": 57.07, "tps_delta": "+302.9%", "kb_delta": "-85.7%"},
    "SLLM-1.3B-H2": {"params": "1.69B", "opt_ppl": 15.95, "sllm_ppl": 3.84, "opt_tps": 119.07, "sllm_tps": 553.95,
                     "opt_kb": 400.01, "sllm_kb": 55.14, "tps_delta": "+365.2%", "kb_delta": "-86.2%"},
}

# The headline figures: SLLM-125M-H1 (the shape of ours: H1 on the smallest OPT) and the range.
THROUGHPUT_125M_H1 = TABLE3["SLLM-125M-H1"]["sllm_tps"] / TABLE3["SLLM-125M-H1"]["opt_tps"]  # 3.04x
THROUGHPUT_MAX = max(r["sllm_tps"] / r["opt_tps"] for r in TABLE3.values())  # 4.65x (SLLM-1.3B-H2)
MEMORY_125M_H1 = TABLE3["SLLM-125M-H1"]["kb_delta"]  # -83.6%
MEMORY_RANGE = ("-83.6%", "-91.0%")  # SLLM-125M-H1 .. SLLM-350M-H4
