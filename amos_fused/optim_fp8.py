"""The 8-bit optimizers: ``AdamW8bit``, ``Adam8bit`` and ``Lion8bit`` (the
ecosystem's names, from bitsandbytes), ``RAdam8bit`` and ``Amos8bit``, the same
constructors, hyper-parameters and update as ``AdamW``, ``Adam``, ``Lion``,
``RAdam`` and ``Amos``, with the moments (Amos: its momentum) kept as
block-scaled FP8 (amos_fused/fp8_states.py): one uint8 code per element plus one
float32 absmax per block of 256, about 26% of the full-precision state of a
float32 model.

Each step decodes a block, runs the full-precision update in float32 (the same
per-element function) and encodes the block back, in one pass (fused kernels on
the 'cpu', 'cuda' and 'triton' backends, Amos8bit's on 'cpu' and 'triton'; the
eager reference on any device).
Params with fewer than 4096 elements, float64 and complex params keep
full-precision states; so do sharded (DTensor) params whose blocks could
straddle a shard (fp8_states.blocks_fit_shards: FSDP2's dim-0 shards of params
whose rows are whole blocks keep FP8 states).  State keys: ``exp_avg`` (codes of m),
``exp_avg_absmax``, and for Adam and RAdam ``exp_avg_sq`` (codes of sqrt(v)),
``exp_avg_sq_absmax``; for Amos ``mu`` and ``mu_absmax``.  Loading a full-precision checkpoint (torch.optim.AdamW's
or AdamW's) quantizes it; loading an 8-bit checkpoint into a full-precision
optimizer decodes it."""
from __future__ import annotations

from . import fp8_states
from .optim import Adam, AdamW, Amos, Lion, RAdam


class _Fp8States:
    """Mixed into a full-precision optimizer class: its ``fp8_state_keys`` are kept
    as FP8 codes for the params fp8_states.keeps_fp8 accepts (those of them the
    full-precision class makes: Amos's ``mu`` only with momentum)."""

    def _fresh_moment(self, p, key):
        if key in self.fp8_state_keys and self._keeps_fp8(p):
            return None  # (made as codes by _new_state)
        return super()._fresh_moment(p, key)

    def _new_state(self, p, group):
        state = super()._new_state(p, group)
        for key in self.fp8_state_keys:
            if key in state and state[key] is None:
                state[key], state[fp8_states.absmax_key(key)] = fp8_states.new_state(p)
        return state

    def _reference_step(self, bucket, group):
        """The full-precision reference step on the decoded states, encoded back."""
        self._on_decoded_states(bucket, lambda: super(_Fp8States, self)._reference_step(bucket, group))

    def _sharded_step(self, bucket, group):
        """The step of slots reduced across shards (Amos), on the decoded states."""
        self._on_decoded_states(bucket, lambda: super(_Fp8States, self)._sharded_step(bucket, group))

    def _on_decoded_states(self, bucket, step):
        """Runs ``step`` with the bucket's coded states decoded to float32, then
        encodes them back."""
        keys = self._coded_keys(bucket)
        if not keys:
            return step()
        coded = {key: (bucket.state[key], bucket.state[fp8_states.absmax_key(key)]) for key in keys}
        for key, (codes, absmax) in coded.items():
            root = key in fp8_states.ROOT_KEYS
            bucket.state[key] = [fp8_states.decoded(c, a, root) for c, a in zip(codes, absmax)]
        try:
            step()
        finally:
            values = {key: bucket.state[key] for key in coded}
            for key, (codes, absmax) in coded.items():
                bucket.state[key] = codes
        for key, (codes, absmax) in coded.items():
            root = key in fp8_states.ROOT_KEYS
            for value, c, a in zip(values[key], codes, absmax):
                fp8_states.store(value, c, a, root)


class _NoAmsgrad:
    def _check_group(self, group):
        super()._check_group(group)
        if group["amsgrad"]:
            raise ValueError("amsgrad=True is not supported with 8-bit states "
                             "(its running maximum would need a third state)")


class AdamW8bit(_NoAmsgrad, _Fp8States, AdamW):
    """AdamW with block-scaled FP8 moments; otherwise ``AdamW`` (same constructor,
    defaults and update).  amsgrad is not supported."""

    fp8_state_keys = ("exp_avg", "exp_avg_sq")


class Adam8bit(_NoAmsgrad, _Fp8States, Adam):
    """Adam (L2 decay) with block-scaled FP8 moments; otherwise ``Adam``."""

    fp8_state_keys = ("exp_avg", "exp_avg_sq")


class RAdam8bit(_Fp8States, RAdam):
    """RAdam with block-scaled FP8 moments; otherwise ``RAdam`` (same constructor,
    defaults, rectification and weight decay)."""

    fp8_state_keys = ("exp_avg", "exp_avg_sq")


class Lion8bit(_Fp8States, Lion):
    """Lion with a block-scaled FP8 momentum; otherwise ``Lion``."""

    fp8_state_keys = ("exp_avg",)


class Amos8bit(_Fp8States, Amos):
    """Amos with its momentum ``mu`` kept as block-scaled FP8 (state keys ``mu``, the
    codes, and ``mu_absmax``); otherwise ``Amos`` (same constructor, defaults,
    slots and update).  Only the momentum is coded: the slots v and b are the
    size of the reduced second moment (one value per row of a matrix with
    ``reduce_axes=1``) and stay in the param's dtype.  Without momentum
    (``momentum=None``, Amos's default) there is nothing to code and it steps
    exactly as ``Amos``.  The fused 'cpu' and 'triton' backends step it (the CPU
    kernel in one pass over memory for rows slots); 'cuda' has no kernel for it
    (backend=None picks Triton there, or the reference)."""

    fp8_state_keys = ("mu",)
