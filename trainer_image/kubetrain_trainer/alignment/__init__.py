"""Preference and reinforcement learning (methods dpo, kto, grpo) in the FSDP2 loop.

- `losses`: the objectives as pure functions of log-probabilities (checked against TRL's)
- `rollout`: sampling groups of completions from the sharded policy (GRPO)
- `rewards`: verifiable rewards and reward models of sampled completions (GRPO)
- `objective`: what `loop.Trainer` calls per step for these methods, with the reference
"""
