"""benchmarks/scripts/profile_score.py runs end to end at a tiny size: every stage it wraps is
reached (a renamed scorer function fails here, not in front of a user), on a 3-channel pool."""

from bench_scripts import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "scripts" / "profile_score.py"


def test_every_stage_is_timed_on_a_small_rgb_pool():
    module = load_script(SCRIPT)
    result = module.main(["--n", "64", "--image-size", "32", "--channels", "3", "--arch", "tiny",
                          "--batch-size", "16", "--device", "cpu", "--threads", "1"])
    assert set(result) == {*module.STAGES, "other", "wall"}
    assert all(result[stage] > 0 for stage in module.STAGES), result
    assert result["wall"] >= result["forward"] + result["backward"] + result["gradcam"]
