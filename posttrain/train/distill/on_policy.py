"""On-policy distillation (GKD, Agarwal et al. 2024; lambda = ``rollout.student_fraction``).

`OnPolicyPlan` is the batch plan `run_loop` reads, except that its batches do not exist in
advance: asking for batch i of epoch e makes the student (through the rollout engine) sample
``rollout.n`` completions of that batch's prompts, with the engine seeded by (seed, e, i). The
distillation step (`posttrain.train.distill.logit.make_step`) then scores every completion
position with the teacher's full distribution: loss = aggregate_t D(p_teacher(.|y<t) ||
q_student(.|y<t)) over the student's own tokens, reverse KL or JSD(beta) in GKD's setting.
The sampling is not differentiated through (GKD, section 3.2). With ``student_fraction`` < 1
(GKD's lambda), batch (e, i) is instead the data's own demonstration batch i of epoch e (a
`SamplePlan`, teacher-scored with the same divergence) when a coin seeded by (seed, e, i) says so.

Batches are sampled when `run_loop` asks for them, i.e. with the current weights; checkpoints
hold the weights and the plan position (epoch, index), and the seed of batch (e, i) is fixed, so
a resumed run samples exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from posttrain.data.collate import pad_collate
from posttrain.data.render import Sample
from posttrain.train.distill.config import DistillRolloutConfig
from posttrain.train.rl_rollout import rollout_seed


class OnPolicyPlan:
    """Prompts cut into ``prompts_per_step`` groups per epoch (shuffled by (seed, epoch)); the
    group's completions are sampled from ``model`` when the batch is read (module docstring)."""

    def __init__(
        self,
        engine: Any,
        model: Any,
        prompts: list[dict],
        ro: DistillRolloutConfig,
        pad_id: int,
        seed: int,
        demos: Any = None,
    ):
        from posttrain.rollout.sampling import rollout_defaults

        self.engine, self.model, self.prompts, self.ro = engine, model, prompts, ro
        self.pad_id, self.seed, self.demos = pad_id, seed, demos
        if ro.student_fraction < 1.0 and demos is None:
            raise ValueError("student_fraction < 1 needs the demonstrations' SamplePlan (demos=)")
        self.params = rollout_defaults(
            n=ro.n, temperature=ro.temperature, top_p=ro.top_p, max_new_tokens=ro.max_new_tokens
        )
        self.per_epoch = -(-len(prompts) // ro.prompts_per_step)

    def __len__(self) -> int:
        return self.per_epoch

    def epoch(self, e: int) -> _Epoch:
        return _Epoch(self, e)

    def from_student(self, e: int, i: int) -> bool:
        """GKD's coin for batch (e, i): True (student samples) with probability student_fraction."""
        if self.ro.student_fraction >= 1.0:
            return True
        return random.Random(f"gkd|{self.seed}|{e}|{i}").random() < self.ro.student_fraction

    def sample(self, e: int, i: int) -> dict[str, torch.Tensor]:
        """Batch i of epoch e: prompt + completion rows, labels on the completion tokens (or the
        demonstrations' batch i of epoch e when GKD's coin says so)."""
        if not self.from_student(e, i):
            demo_epoch = self.demos.epoch(e)
            return demo_epoch[i % len(demo_epoch)]
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1000003 + e).shuffle(order)
        pps = self.ro.prompts_per_step
        records = [self.prompts[j] for j in order[i * pps : (i + 1) * pps]]
        self.engine.update_weights(self.model)  # a no-op for the hf engine sharing the module
        params = self.params.replace(seed=rollout_seed(self.seed, e * self.per_epoch + i, 0))
        completions = self.engine.generate(records, params)
        samples = [
            Sample(c.prompt_ids + c.token_ids, [-100] * len(c.prompt_ids) + c.token_ids) for c in completions
        ]
        batch = pad_collate(samples, self.pad_id)
        batch["completion_tokens"] = torch.tensor(float(sum(len(c.token_ids) for c in completions)))
        return batch


class _Epoch:
    """One epoch's batches, sampled on access."""

    def __init__(self, plan: OnPolicyPlan, e: int):
        self.plan, self.e = plan, e

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self.plan):
            raise IndexError(i)
        return self.plan.sample(self.e, i)
