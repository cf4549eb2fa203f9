"""Colocated rollout: generation from the policy's own megatron modules (see engine.py)."""
from r1mega.rollout.engine import RolloutEngine
from r1mega.rollout.types import Completion, GenerationRequest

__all__ = ["RolloutEngine", "GenerationRequest", "Completion"]
