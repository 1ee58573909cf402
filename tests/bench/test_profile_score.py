"""benchmarks/scripts/profile_score.py runs end to end at a tiny size: every stage it wraps is
reached (a renamed scorer function fails here, not in front of a user), on a 3-channel pool."""

import pytest
from bench_scripts import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "scripts" / "profile_score.py"


def test_every_stage_is_timed_on_a_small_rgb_pool():
    module = load_script(SCRIPT)
    result = module.main(["--n", "64", "--image-size", "32", "--channels", "3", "--arch", "tiny",
                          "--batch-size", "16", "--device", "cpu", "--threads", "1"])
    assert set(result) == {*module.STAGES, "other", "wall"}
    assert all(result[stage] > 0 for stage in module.STAGES), result
    assert result["wall"] >= result["forward"] + result["backward"] + result["gradcam"]


@pytest.mark.parametrize(("args", "message"), [
    (["--n", "0"], "--n must be at least 1"),
    (["--arch", "nope"], "unknown architecture 'nope'"),
    (["--threads", "-1"], "--threads: expected 0"),
])
def test_bad_flags_are_one_line_and_exit_2(args, message, capsys):
    module = load_script(SCRIPT)
    with pytest.raises(SystemExit) as exit_info:
        module.main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
