"""The anomaly detectors on hand-made metric streams: each fires exactly where its rule says."""

from __future__ import annotations

import json

import pytest

from posttrain.errors import ConfigError
from posttrain.train.anomaly import PAUSED_EXIT, AnomalyConfig, AnomalyMonitor, RunPaused


def _first(monitor: AnomalyMonitor, rows: list[dict], kind: str) -> int | None:
    """The first step (1-based) at which `kind` fires."""
    for step, row in enumerate(rows, 1):
        if any(a.kind == kind for a in monitor.update(step, row)):
            return step
    return None


def test_grad_spike_fires_on_the_spike_not_on_a_noisy_but_steady_run():
    steady = [{"grad_norm": 1.0 + 0.3 * (i % 3)} for i in range(30)]
    assert _first(AnomalyMonitor(AnomalyConfig(grad_spike=5.0)), steady, "grad_spike") is None
    spiky = steady[:12] + [{"grad_norm": 7.0}] + steady[12:]  # median of the 10 before is 1.3
    assert _first(AnomalyMonitor(AnomalyConfig(grad_spike=5.0)), spiky, "grad_spike") == 13
    assert _first(AnomalyMonitor(AnomalyConfig(grad_spike=0.0)), spiky, "grad_spike") is None  # 0 = off
    # steps where no group had a gradient log a zero norm: no scale to compare against, no crash
    idle = [{"grad_norm": 0.0}] * 5 + [{"grad_norm": 0.4}]
    assert _first(AnomalyMonitor(AnomalyConfig(grad_spike=5.0)), idle, "grad_spike") is None
    # RL: steps where every group had equal rewards carry only the KL gradient (measured on
    # SmolLM2: 0.002 vs 0.7 with a policy gradient); they are no scale for the others
    kl_only = {"grad_norm": 0.002, "rollout/zero_variance_frac": 1.0}
    signal = {"grad_norm": 0.7, "rollout/zero_variance_frac": 0.5}
    mixed = [signal, kl_only, kl_only, signal, kl_only, signal, kl_only, signal, kl_only, signal, signal]
    assert _first(AnomalyMonitor(AnomalyConfig(grad_spike=5.0)), mixed, "grad_spike") is None
    spike = {"grad_norm": 9.0, "rollout/zero_variance_frac": 0.5}
    assert _first(AnomalyMonitor(AnomalyConfig(grad_spike=5.0)), [*mixed, spike], "grad_spike") == 12


def test_kl_limit_and_kl_rate():
    rows = [{"kl/token_mean": 0.01 * i} for i in range(40)]  # +0.01 per step
    assert _first(AnomalyMonitor(AnomalyConfig(kl_max=0.2)), rows, "kl") == 22  # 0.21 > 0.2 at i=21
    # rate: over a window of 10 steps the KL grows 0.01/step; a 0.005 limit fires once the window is full
    assert _first(AnomalyMonitor(AnomalyConfig(kl_max=0.0, kl_rate=0.005, window=10)), rows, "kl") == 11
    assert _first(AnomalyMonitor(AnomalyConfig(kl_max=0.0, kl_rate=0.02, window=10)), rows, "kl") is None


def test_entropy_band_and_its_config_error():
    rows = [{"pg/entropy": e} for e in (1.0, 0.8, 0.5, 0.2, 0.04)]
    assert _first(AnomalyMonitor(AnomalyConfig(entropy_min=0.05)), rows, "entropy") == 5
    assert _first(AnomalyMonitor(AnomalyConfig(entropy_max=0.9)), rows, "entropy") == 1
    with pytest.raises(ConfigError, match="entropy band"):
        AnomalyMonitor(AnomalyConfig(entropy_min=0.5, entropy_max=0.3))


def test_length_growth_over_the_window_and_the_clipped_share():
    rows = [{"response/length_mean": 20.0 * 1.1**i, "response/clipped_ratio": 0.0} for i in range(20)]
    # growth over the 11 values in the window: 1.1**10 - 1 = 1.59 > 1.0 at the first full window
    assert _first(AnomalyMonitor(AnomalyConfig(length_growth=1.0, window=10)), rows, "length") == 11
    assert _first(AnomalyMonitor(AnomalyConfig(length_growth=2.0, window=10)), rows, "length") is None
    clipped = [{"response/clipped_ratio": c} for c in (0.1, 0.3, 0.6)]
    assert _first(AnomalyMonitor(AnomalyConfig(clipped_max=0.5)), clipped, "length") == 3
    always = [{"response/clipped_ratio": 1.0}] * 5  # clipped from the start: not a change
    assert _first(AnomalyMonitor(AnomalyConfig(clipped_max=0.5)), always, "length") is None


def test_no_signal_counts_consecutive_steps_and_says_why():
    never = [{"rollout/zero_variance_frac": 1.0, "reward/total_mean": 0.0}] * 6
    mon = AnomalyMonitor(AnomalyConfig(no_signal_steps=4))
    found = [a for step, row in enumerate(never, 1) for a in mon.update(step, row)]
    assert found[0].step == 4 and "never succeeds" in found[0].message and "SFT" in found[0].message
    broken = [{"rollout/zero_variance_frac": f} for f in (1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0)]
    assert _first(AnomalyMonitor(AnomalyConfig(no_signal_steps=4)), broken, "no_signal") is None
    always = [{"rollout/zero_variance_frac": 1.0, "reward/total_mean": 1.0}] * 4
    mon = AnomalyMonitor(AnomalyConfig(no_signal_steps=4))
    assert "always succeeds" in [a for s, r in enumerate(always, 1) for a in mon.update(s, r)][0].message


def test_weak_signal_is_said_once_per_window_and_never_pauses():
    """The issue's new-user run on today's default: 75-100% of groups equal, never 5 steps in a row."""
    shares = [0.96, 0.96, 0.75, 0.79, 1.0, 0.96, 0.96, 0.92, 0.96, 1.0, 0.96, 1.0, 1.0, 0.92, 0.88] * 2
    rows = [{"rollout/zero_variance_frac": f, "reward/total_mean": 0.01} for f in shares]
    mon = AnomalyMonitor(AnomalyConfig(window=10, weak_signal=0.9))
    found = [a for step, row in enumerate(rows, 1) for a in mon.update(step, row)]
    assert [(a.kind, a.step, a.warn_only) for a in found] == [
        ("weak_signal", 11, True),  # window mean of steps 2-11: 0.922
        ("weak_signal", 21, True),
    ]
    assert "never succeeds" in found[0].message
    strong = [{"rollout/zero_variance_frac": 0.5}] * 30
    assert _first(AnomalyMonitor(AnomalyConfig(window=10)), strong, "weak_signal") is None


def test_warn_only_anomalies_never_pause_the_guard(tmp_path):
    from posttrain.monitor.logger import RunLogger
    from posttrain.train.anomaly import AnomalyGuard

    logger = RunLogger(tmp_path, tensorboard=False)
    guard = AnomalyGuard(AnomalyConfig(window=2, weak_signal=0.9, no_signal_steps=0), logger)
    rows = [{"rollout/zero_variance_frac": 0.95}] * 5  # said at steps 3 and 5
    assert all(
        guard.check(s, r, save=lambda: None) is None for s, r in enumerate(rows, 1)
    )  # pause is the default
    logger.close(report=False)
    events = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["action"]) for e in events] == [("weak_signal", "warn")] * 2


def test_reward_up_held_out_down_is_hacking_reward_up_held_out_up_is_not():
    def stream(acc: list[float]) -> list[dict]:
        rows = []
        for i in range(30):  # the reward climbs 0.1 -> 0.68 throughout
            row = {"reward/total_mean": 0.1 + 0.02 * i}
            if i % 10 == 9:
                row["eval/task_accuracy/overall"] = acc[i // 10]
            rows.append(row)
        return rows

    cfg = AnomalyConfig(hack_rise=0.05, hack_drop=0.05)
    assert _first(AnomalyMonitor(cfg), stream([0.40, 0.30, 0.20]), "reward_hacking") == 20
    assert _first(AnomalyMonitor(cfg), stream([0.40, 0.45, 0.50]), "reward_hacking") is None
    # an evaluation at step 0 (before any reward): the rise is read within the steps since
    rows = [{"eval/task_accuracy/overall": 0.4}] + stream([0.2, 0.2, 0.2])[:10]
    mon = AnomalyMonitor(cfg)
    found = [a for step, row in enumerate(rows) for a in mon.update(step, row)]
    assert [a.step for a in found] == [10]  # the second evaluation: stream row 9 is step 10


def test_a_shaping_term_rising_while_the_task_term_falls_is_hacking():
    rows = [{"reward/format_mean": 0.1 + 0.05 * i, "reward/scorer_mean": 0.5 - 0.03 * i} for i in range(15)]
    cfg = AnomalyConfig(shaping_terms=["format"], window=10, hack_rise=0.05, hack_drop=0.05)
    assert _first(AnomalyMonitor(cfg), rows, "reward_hacking") == 11
    both_up = [
        {"reward/format_mean": 0.1 + 0.05 * i, "reward/scorer_mean": 0.2 + 0.03 * i} for i in range(15)
    ]
    assert _first(AnomalyMonitor(cfg), both_up, "reward_hacking") is None


def test_loss_divergence_against_the_best_recent_mean_and_the_start():
    rows = [{"loss": 2.0 - 0.1 * i} for i in range(15)] + [{"loss": 20.0}] * 6
    # best 5-step median: 0.8 (of 1.0 .. 0.6); the median of the last 5 is 20 from step 18 on (three
    # of them 20), > 3 x 0.8 and above the start's 2.0; at step 16-17 one or two bad steps are not
    assert _first(AnomalyMonitor(AnomalyConfig(loss_divergence=3.0, window=5)), rows, "loss_divergence") == 18
    slow = [{"loss": 2.0 - 0.1 * i} for i in range(15)] + [{"loss": 2.0}] * 6  # back up, not 3x
    assert (
        _first(AnomalyMonitor(AnomalyConfig(loss_divergence=3.0, window=5)), slow, "loss_divergence") is None
    )
    # a far-too-high lr (SFT of the tiny model at lr 1.0, measured): caught at the third step of
    # the blow-up, (12.9 + 24.7 + 60.4) / 3 = 32.7 > 3 x 5.65, though no full window exists yet
    blow_up = [{"loss": v} for v in (5.65, 12.9, 24.7, 60.4, 95.1)]
    assert _first(AnomalyMonitor(AnomalyConfig()), blow_up, "loss_divergence") == 4
    # a loss near 0 tripling on noise is no divergence: it stays below where the run started
    noisy = [{"loss": v} for v in (0.7, 0.3, 0.1, 0.02, 0.01, 0.01, 0.05, 0.06, 0.07)]
    assert _first(AnomalyMonitor(AnomalyConfig()), noisy, "loss_divergence") is None
    # one early spike taken back (a PRM's first steps at a high lr, measured: 0.681 -> 3.49): the
    # 2-step mean 2.08 is over 3 x 0.681, but no full 3-step mean is
    spike = [{"loss": v} for v in (0.681, 3.49, 0.60, 0.50, 0.45)]
    assert _first(AnomalyMonitor(AnomalyConfig()), spike, "loss_divergence") is None
    # batches that differ by design (a PRM's length buckets, measured in a healthy run at lr 1e-3):
    # lucky easy batches bring a 3-step mean to 0.14, then three hard ones average 0.93; the window
    # median stays near 0.4, so this is no divergence (the best 3-step mean paused it at step 63)
    buckets = [
        0.54,
        0.47,
        0.66,
        0.44,
        0.30,
        0.55,
        0.47,
        0.40,
        0.50,
        0.41,
        0.39,
        0.53,
        0.11,
        0.24,
        0.15,
        0.027,
    ]
    healthy = [{"loss": v} for v in (0.769, *buckets, 0.96, 0.865, 0.957, 0.225, 0.52)]
    assert _first(AnomalyMonitor(AnomalyConfig()), healthy, "loss_divergence") is None
    # the next round's PRM in its first 16 steps (lr warming up to 1e-3): (0.51 + 1.934 + 1.38) / 3 =
    # 1.27 is over 3 x the best median 0.415, but no new high: the window before held 1.608
    start = (0.997, 1.41, 0.659, 0.645, 0.659, 0.676, 0.321, 0.217, 0.131, 1.334, 0.055, 1.608, 0.027)
    swinging = [{"loss": v} for v in (*start, 0.51, 1.934, 1.38)]
    assert _first(AnomalyMonitor(AnomalyConfig()), swinging, "loss_divergence") is None
    # round 3's PRM at step 138-140: 1.234, 0.623, 1.036 after a window up to 0.882 (3-step mean
    # 0.964 paused it); the median of the last 5 is 0.665, under 3 x the best median 0.258
    late = (0.473, 0.599, 0.219, 0.644, 0.211, 0.106, 0.37, 0.412, 0.066, 0.872, 0.305, 0.206, 0.094, 0.611,
            0.505, 0.023, 0.351, 0.466, 0.468, 0.502, 0.568, 0.472, 0.768, 0.453, 0.573, 0.533, 0.097, 0.402,
            0.479, 0.474, 0.339, 0.882, 0.098, 0.125, 0.59, 0.07, 0.665, 1.234, 0.623, 1.036)  # fmt: skip
    assert _first(AnomalyMonitor(AnomalyConfig()), [{"loss": v} for v in late], "loss_divergence") is None


def test_one_loss_far_above_the_start_pauses_though_the_next_look_normal():
    # a reward model at lr 3 and lr 30 (tiny default, measured on an Intel Xeon with AMX): one step
    # blows the scores up, then every pair scores equal (loss ln 2 = 0.693, the start's level), so
    # no median of later steps rises; the spike (step 2) is 173x and 8,158x the first loss
    lr3 = (0.91, 157.347, 0.693, 4.52, 4.52, 0.693, 0.693, 0.693, 0.693, 0.693, 0.52, 0.693)
    lr30 = (0.91, 7424.173, *[0.693] * 10)
    for losses in (lr3, lr30):
        rows = [{"loss": v} for v in losses]
        assert _first(AnomalyMonitor(AnomalyConfig()), rows, "loss_divergence") == 2
        assert _first(AnomalyMonitor(AnomalyConfig(loss_spike=0)), rows, "loss_divergence") is None
    # 40x the first loss is under loss_spike 50
    assert (
        _first(AnomalyMonitor(AnomalyConfig()), [{"loss": v} for v in (0.91, 36.4, 0.8)], "loss_divergence")
        is None
    )
    # the base is the larger of the first loss and the median of the window before: after a lucky
    # first batch (0.35) 20 is 57x the first loss but 22x the median 0.9, no spike; 46 (51x) is
    lucky = [{"loss": v} for v in (0.35, 0.9, 0.9, 0.8, 1.0, 0.9)]
    assert _first(AnomalyMonitor(AnomalyConfig()), [*lucky, {"loss": 20.0}], "loss_divergence") is None
    assert _first(AnomalyMonitor(AnomalyConfig()), [*lucky, {"loss": 46.0}], "loss_divergence") == 7


def test_state_round_trip_continues_the_window_exactly():
    rows = [{"grad_norm": 1.0, "rollout/zero_variance_frac": 1.0, "reward/total_mean": 0.0}] * 3
    whole, first = (
        AnomalyMonitor(AnomalyConfig(no_signal_steps=5)),
        AnomalyMonitor(AnomalyConfig(no_signal_steps=5)),
    )
    for step, row in enumerate(rows, 1):
        whole.update(step, row)
        first.update(step, row)
    resumed = AnomalyMonitor(AnomalyConfig(no_signal_steps=5))
    resumed.load_state_dict(first.state_dict())
    tail = [*rows, {"grad_norm": 50.0, "rollout/zero_variance_frac": 1.0, "reward/total_mean": 0.0}]
    a = [x.kind for s, r in enumerate(tail[:2], 4) for x in whole.update(s, r)]
    b = [x.kind for s, r in enumerate(tail[:2], 4) for x in resumed.update(s, r)]
    assert a == b == ["no_signal"]  # the 5th step in a row, whether or not the run was resumed


def test_run_paused_names_the_metric_threshold_and_settings():
    mon = AnomalyMonitor(AnomalyConfig(kl_max=0.1))
    (anomaly,) = mon.update(7, {"kl/token_mean": 0.5})
    err = RunPaused(anomaly, "runs/x/checkpoints/step_7")
    assert err.exit_code == PAUSED_EXIT == 75
    assert "kl/token_mean" in str(err) and "0.1" in str(err) and "algorithm.kl.coef" in err.fix
    assert anomaly.event()["event"] == "anomaly" and anomaly.event()["step"] == 7


def test_a_resume_after_a_pause_starts_the_detectors_afresh_an_interrupted_one_does_not(tmp_path):
    from posttrain.monitor.logger import RunLogger
    from posttrain.train.anomaly import AnomalyGuard

    cfg = AnomalyConfig(kl_max=1.0)
    guard = AnomalyGuard(cfg, RunLogger(tmp_path, tensorboard=False))
    guard.check(1, {"kl/token_mean": 0.5}, save=lambda: "ckpt")
    interrupted = guard.state_dict()
    with pytest.raises(RunPaused):
        guard.check(2, {"kl/token_mean": 2.0}, save=lambda: "ckpt")
    paused = guard.state_dict()
    assert paused["paused"] and not interrupted["paused"]
    resumed = AnomalyGuard(cfg, RunLogger(tmp_path / "b", tensorboard=False))
    resumed.load_state_dict(interrupted)
    assert list(resumed.monitor.history["kl/token_mean"]) == [0.5]
    resumed = AnomalyGuard(cfg, RunLogger(tmp_path / "c", tensorboard=False))
    resumed.load_state_dict({**paused, "rollbacks": 1})
    assert resumed.monitor.history == {} and resumed.rollbacks == 1


def test_a_resume_after_a_pause_keeps_the_runs_first_loss(tmp_path):
    """Measured: a PRM resumed after a pause drew an easy first batch (0.071), and 1.06, 0.617 then
    paused it again as a divergence from that 'start'; the run's start was 0.997."""
    from posttrain.monitor.logger import RunLogger
    from posttrain.train.anomaly import AnomalyGuard

    cfg = AnomalyConfig()
    guard = AnomalyGuard(cfg, RunLogger(tmp_path, tensorboard=False))
    with pytest.raises(RunPaused):
        for step, loss in enumerate((0.997, 0.2, 0.1, 0.1, 5.0, 6.0, 7.0), 1):
            guard.check(step, {"loss": loss}, save=lambda: "ckpt")
    resumed = AnomalyGuard(cfg, RunLogger(tmp_path / "b", tensorboard=False))
    resumed.load_state_dict(guard.state_dict())
    assert resumed.monitor.history == {} and resumed.monitor.first_loss == 0.997
    for step, loss in enumerate((0.071, 1.06, 0.617, 0.5), 8):
        resumed.check(step, {"loss": loss}, save=lambda: "ckpt")  # no pause: never above 0.997
    fresh = AnomalyGuard(cfg, RunLogger(tmp_path / "c", tensorboard=False))
    with pytest.raises(RunPaused):  # what the resume did before: 0.071 as the start
        for step, loss in enumerate((0.071, 1.06, 0.617), 8):
            fresh.check(step, {"loss": loss}, save=lambda: "ckpt")
