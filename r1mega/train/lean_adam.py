"""Memory-lean AdamW inside megatron's optimizer classes (``optimizer.master_weights``,
``optimizer.moments_dtype``); the math is r1mega/train/lean_adam_math.py.

Bytes per parameter, bf16 model (param + grad + master + moments):
    fp32 master, fp32 grad buffer, fp32 moments (megatron's default)   2 + 4 + 4 + 8 = 18
    bf16_remainder, bf16 grads, fp32 moments                            2 + 2 + 2 + 8 = 14
    bf16_remainder, bf16 grads, bf16 moments                            2 + 2 + 2 + 4 = 10
    bf16_stochastic, bf16 grads, bf16 moments                           2 + 2 + 0 + 4 =  8
With a lean master there is no fp32 copy: megatron's ``FP32Optimizer`` drives :class:`LeanAdamW`
directly over the bf16 parameters, and the DDP grad buffer is bf16 (``grad_reduce_in_fp32=false``,
checked by config validation). With an fp32 master and bf16 moments, megatron's
``Float16OptimizerWithFloat16Params`` keeps its fp32 masters and :class:`LeanAdamW` only stores
the moments in bf16.

:class:`LeanAdamW` honours the two device tensors of torch's fused AdamW that the sync-free step
(r1mega/train/device_step.py) sets: ``grad_scale`` (every gradient divided by it: the clip) and
``found_inf`` (non-zero: nothing changes, step counters included). On CUDA one Triton kernel per
tensor does the whole update (r1mega/ops/lean_adam_triton.py); elsewhere the reference runs.
"""
from __future__ import annotations

from typing import Optional

import torch

from r1mega.train.lean_adam_math import (MASTER_MODES, MOMENT_DTYPES, AdamHyper, amax_bits,
                                         lean_step_reference)


def _mix_seed(seed: int, index: int, step: int) -> int:
    """A distinct, reproducible generator seed per (run seed, tensor, step)."""
    return (seed * 0x9E3779B1 + index * 0x85EBCA77 + step * 0xC2B2AE3D) % (2 ** 63 - 1)


class LeanAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with lean state; see the module docstring.

    State per parameter: ``step`` (0-d fp32, as torch keeps it), ``exp_avg`` / ``exp_avg_sq``
    (``moments_dtype``), and ``remainder`` (int16, bf16_remainder only)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, master_weights: str = "bf16_remainder",
                 moments_dtype: str = "fp32", seed: int = 0):
        if master_weights not in MASTER_MODES:
            raise ValueError(f"optimizer.master_weights={master_weights!r}: use one of {MASTER_MODES}")
        if moments_dtype not in MOMENT_DTYPES:
            raise ValueError(f"optimizer.moments_dtype={moments_dtype!r}: use one of {sorted(MOMENT_DTYPES)}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.master_weights, self.moments_dtype, self.seed = master_weights, moments_dtype, seed
        # fp32 parameters (an fp32 master's, or those a bf16 model keeps in fp32 on purpose, such
        # as MoE routers) are their own master; the lean master modes are for bf16 ones.
        allowed = {torch.float32} if master_weights == "fp32" else {torch.float32, torch.bfloat16}
        for i, p in enumerate(self._params()):
            if p.dtype not in allowed:
                raise ValueError(
                    f"optimizer.master_weights={master_weights} steps "
                    f"{'/'.join(sorted(str(d) for d in allowed))} parameters, but parameter {i} of "
                    f"shape {tuple(p.shape)} is {p.dtype}; set precision.dtype=bf16 (lean master) "
                    f"or optimizer.master_weights=fp32.")
        # Set around a step by device_optimizer_step / the host clip; None: no scale, no skip.
        self.grad_scale: Optional[torch.Tensor] = None
        self.found_inf: Optional[torch.Tensor] = None
        # Take the step's 1/token-count scale inside grad_scale instead of a pass over the grad
        # buffer (TrainStep, device_step.DeferredGradScale). None: on CUDA only, where the pass
        # costs time; the CPU path keeps megatron's scale and stays bit-identical to its
        # fp32-master optimizer.
        self.fold_token_scale: Optional[bool] = None
        # id(param) -> [param, int32 (1,) amax as float32 bits, (data_ptr, _version) after the
        # step that wrote it]: max |w| for the tensorwise FP8 weight cache (track_amax).
        self._amax: dict[int, list] = {}

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def folds_token_scale(self) -> bool:
        if self.fold_token_scale is not None:
            return self.fold_token_scale
        return all(p.is_cuda for p in self._params())

    def mode_of(self, p: torch.Tensor) -> str:
        """The master mode of one parameter: fp32 parameters are their own master."""
        return "fp32" if p.dtype == torch.float32 else self.master_weights

    def track_amax(self, param: torch.Tensor) -> None:
        """Make max |param| in each step from the values it writes (no pass over the weight of
        its own): :meth:`weight_amax`. For the bf16 parameters this optimizer steps directly."""
        if not any(param is p for p in self._params()):
            raise ValueError(f"track_amax: the parameter of shape {tuple(param.shape)} is not "
                             f"one this optimizer steps")
        if self.mode_of(param) == "fp32":
            raise ValueError("track_amax: only bf16 parameters (a lean master) get their amax "
                             "from the step; an fp32 master is copied to the model afterwards")
        if id(param) not in self._amax:
            self._amax[id(param)] = [param, torch.zeros(1, dtype=torch.int32, device=param.device),
                                     None]

    def weight_amax(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """float32 (1,) max |param| as the last step left it (NaN if it holds one), or None:
        not tracked, no step yet, or the parameter changed since (its storage or version; a
        weights-only load also clears it, :meth:`reset_remainders`)."""
        entry = self._amax.get(id(param))
        if entry is None or entry[0] is not param or entry[2] != (param.data_ptr(), param._version):
            return None
        return entry[1].view(torch.float32)

    def _amax_slots(self, live: list) -> Optional[list]:
        """The zeroed int32 slots of ``live``'s tracked parameters (None for the others)."""
        if not self._amax:
            return None
        slots = [self._amax[id(p)][1] if id(p) in self._amax else None for p in live]
        tracked = [s for s in slots if s is not None]
        if not tracked:
            return None
        torch._foreach_zero_(tracked)
        return slots

    def _amax_written(self, live: list, slots: Optional[list]) -> None:
        for p, s in zip(live, slots or ()):
            if s is not None:
                self._amax[id(p)][2] = (p.data_ptr(), p._version)

    def init_state(self) -> None:
        """Zero moments, step 0 and (remainder mode) a zero remainder: the master starts as the
        bf16 weight exactly. Also megatron's ``init_state_fn`` (checkpoint loading templates)."""
        mdt = MOMENT_DTYPES[self.moments_dtype]
        for p in self._params():
            state = self.state[p]
            if len(state) > 0:
                continue
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=mdt, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=mdt, memory_format=torch.preserve_format)
            if self.mode_of(p) == "bf16_remainder":
                state["remainder"] = torch.zeros_like(p, dtype=torch.int16)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.init_state()
        index = 0
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            index_of = {id(p): index + i for i, p in enumerate(group["params"])}
            index += len(group["params"])
            if not live:
                continue
            steps = [self.state[p]["step"] for p in live]
            # Every counter advances unless found_inf: one foreach launch, no host read (a list
            # of tensors: with one tensor as the scalar, _foreach_add_ reads it with .item()).
            if self.found_inf is not None:
                inc = 1.0 - self.found_inf.reshape(()).float()
                torch._foreach_add_(steps, [inc] * len(steps))
            else:
                torch._foreach_add_(steps, 1.0)
            beta1, beta2 = group["betas"]
            h = AdamHyper(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                          weight_decay=float(group["weight_decay"]))
            slots = self._amax_slots(live)
            if live[0].is_cuda:
                from r1mega.ops.lean_adam_triton import lean_adamw_cuda

                lean_adamw_cuda(live, [self.state[p] for p in live], h,
                                [self.mode_of(p) for p in live],
                                grad_scale=self.grad_scale, found_inf=self.found_inf,
                                seeds=[_mix_seed(self.seed, index_of[id(p)], 0) for p in live],
                                amax=slots)
            else:
                for p, slot in zip(live, slots or [None] * len(live)):
                    self._reference_step(p, h, index_of[id(p)])
                    if slot is not None:
                        slot.copy_(amax_bits(p))
            self._amax_written(live, slots)
        return loss

    def _reference_step(self, p: torch.Tensor, h: AdamHyper, index: int) -> None:
        state = self.state[p]
        step = int(state["step"].item())  # host read: free on the CPU path this serves
        gen = torch.Generator(device=p.device).manual_seed(_mix_seed(self.seed, index, step))
        out = lean_step_reference(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                  state.get("remainder"), max(step, 1), h, self.mode_of(p),
                                  grad_scale=self.grad_scale, found_inf=self.found_inf,
                                  generator=gen)
        p.copy_(out["param"])
        state["exp_avg"].copy_(out["exp_avg"])
        state["exp_avg_sq"].copy_(out["exp_avg_sq"])
        if out["remainder"] is not None:
            state["remainder"].copy_(out["remainder"])

    @torch.no_grad()
    def reset_remainders(self) -> None:
        """The weights were replaced from outside (a weights-only load): each master becomes
        its new bf16 weight exactly, as megatron's reload_model_params re-copies fp32 masters."""
        for state in self.state.values():
            if "remainder" in state:
                state["remainder"].zero_()
        for entry in self._amax.values():  # the weights were written outside a step
            entry[2] = None

    def masters(self) -> list[torch.Tensor]:
        """fp32 copies of the weights this optimizer steps (exact masters in remainder mode)."""
        from r1mega.train.lean_adam_math import join_master

        self.init_state()
        return [join_master(p, self.state[p]["remainder"]) if self.mode_of(p) == "bf16_remainder"
                else p.detach().float() for p in self._params()]

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts every floating state tensor to the parameter's dtype (fp32 moments
        and int16 remainders would be rounded to bf16); this one keeps each saved dtype and
        checks that the saved state is of this optimizer's modes."""
        saved = state_dict["state"]
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        mdt = MOMENT_DTYPES[self.moments_dtype]
        for pid, p in zip(ids, self._params()):
            if pid not in saved:
                continue
            s = saved[pid]
            has_rem = "remainder" in s
            if has_rem != (self.mode_of(p) == "bf16_remainder") or s["exp_avg"].dtype != mdt:
                raise ValueError(
                    f"optimizer checkpoint state of parameter {pid} has keys {sorted(s)} and "
                    f"{s['exp_avg'].dtype} moments, not the state of optimizer.master_weights="
                    f"{self.master_weights}, optimizer.moments_dtype={self.moments_dtype}; resume "
                    f"with the settings it was saved under (or load weights only).")
            self.state[p] = {k: (v.to(device=p.device, copy=True) if torch.is_tensor(v) else v)
                             for k, v in s.items()}
            if not torch.is_tensor(self.state[p]["step"]):
                self.state[p]["step"] = torch.tensor(float(self.state[p]["step"]), device=p.device)
            self.state[p]["step"] = self.state[p]["step"].to(torch.float32).reshape(())


def lean_state_fn(opt, config=None) -> None:
    """megatron's ``init_state_fn`` signature for :class:`LeanAdamW`."""
    if opt is not None:
        opt.init_state()


def replace_inner_adam(megatron_opt, master_weights: str, moments_dtype: str, seed: int) -> None:
    """Swap torch AdamW inside each (chained) megatron optimizer for :class:`LeanAdamW` over the
    same parameter groups (megatron's lr/wd multipliers and flags travel with the groups)."""
    for sub in getattr(megatron_opt, "chained_optimizers", None) or [megatron_opt]:
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        if not isinstance(inner, (torch.optim.AdamW, torch.optim.Adam)):
            raise ValueError(f"optimizer.master_weights/moments_dtype need Adam; megatron built "
                             f"{type(inner).__name__}. Set optimizer.name=adam.")
        d = inner.defaults
        groups = [{k: v for k, v in g.items() if k not in ("foreach", "fused", "capturable",
                                                          "differentiable", "maximize", "amsgrad",
                                                          "decoupled_weight_decay")}
                  for g in inner.param_groups]
        sub.optimizer = LeanAdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"],
                                  weight_decay=d["weight_decay"], master_weights=master_weights,
                                  moments_dtype=moments_dtype, seed=seed)
        sub.init_state_fn = lean_state_fn
        if master_weights != "fp32":  # FP32Optimizer's own reload is a no-op
            sub.reload_model_params = lambda state_dict=None, o=sub.optimizer: o.reset_remainders()


def lean_optimizers(megatron_opt) -> list[LeanAdamW]:
    return [s.optimizer for s in (getattr(megatron_opt, "chained_optimizers", None) or [megatron_opt])
            if isinstance(getattr(s, "optimizer", None), LeanAdamW)]
