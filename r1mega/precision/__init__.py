"""Precision policy: bf16 / FP8 recipes, quantisation, the FP8 GEMM and linears, TE detection."""
