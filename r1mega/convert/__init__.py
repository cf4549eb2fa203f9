"""Hugging Face <-> r1mega/megatron checkpoints, verified against transformers.

Public API (import from the submodules; this package imports nothing heavy):
  hf_bridge.load_hf_into_model(chunks, hf_dir, model_cfg, ctx)   HF weights into any TP/PP layout
  hf_bridge.export_hf(chunks, model_cfg, ctx, out_dir, dtype=...) gathered HF dir (collective)
  mcore_io.save_model_state(chunks, path, model_cfg) / load_model_state(chunks, path, strict=True)
  hf_config.model_config_from_hf_dir(hf_dir)                      ModelConfig of a HF checkpoint
  verify.verify_against_hf(chunks, hf_dir, model_cfg, ctx)        max |Δlogits| and mean KL
  gguf.gguf_to_hf_dir(gguf_path, out_dir, dtype) / gguf.smollm2_hf_dir(out_dir)
  cli.main(argv)                                                  `r1mega convert ...`
"""
