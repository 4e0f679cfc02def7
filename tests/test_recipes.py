"""--recipe NAME (recipes.py): the reference's named configs as presets of the command line."""

import dataclasses

import pytest

import flow_grpo as fg
import recipes


def test_every_recipe_sets_only_config_fields_and_passes_the_batch_checks():
    fields = {f.name for f in dataclasses.fields(fg.Config)}
    assert set(recipes.RECIPES) == set(recipes.DESCRIPTIONS)
    for name, values in recipes.RECIPES.items():
        assert set(values) <= fields, f"{name}: not Config fields: {set(values) - fields}"
        cfg = fg.parse_config(["--recipe", name])
        assert all(getattr(cfg, k) == v for k, v in values.items())
        fg.plan_batches(cfg, world_size=1)  # one GPU, the default groups per epoch


def test_fast_nocfg_recipe_is_the_reference_config_and_explicit_flags_win():
    cfg = fg.parse_config(["--recipe", "geneval-fast-nocfg", "--beta", "0.01", "--model", "tiny-random"])
    # config/grpo.py geneval_sd3_fast_nocfg: guidance 1, CPS at 0.8, window 3 in (0, 5), clip range 1e-5
    assert (cfg.guidance_scale, cfg.sde_type, cfg.noise_level) == (1.0, "cps", 0.8)
    assert (cfg.fast_window, cfg.fast_window_start, cfg.fast_window_range) == (3, 0, 5)
    assert (cfg.reward, cfg.prompts) == ("geneval", "geneval")
    assert cfg.beta == 0.01  # given on the command line: wins over the recipe's 0
    assert cfg.clip_range == 1e-5  # the recipe wins over the tiny-random preset (1e-2) where it departs from the
    assert cfg.resolution == recipes.PRESETS["tiny-random"]["resolution"]  # paper's defaults; its 512 is the default,
    assert cfg.lr == recipes.PRESETS["tiny-random"]["lr"]  # so the preset's 32 px stays, as does what the recipe leaves
    assert cfg.group_size == recipes.PRESETS["tiny-random"]["group_size"]  # (the recipe's G = 24 is the default too)
    assert fg.parse_config(["--recipe", "geneval-fast-nocfg"]).group_size == 24
    assert fg.parse_config(["--recipe", "pickscore"]).beta == 0.01 and fg.parse_config([]).beta is None


def test_help_lists_the_recipes(capsys):
    with pytest.raises(SystemExit):
        fg.parse_config(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in recipes.RECIPES:
        assert name in out
    assert "geneval_sd3_fast_nocfg" in out


def test_unknown_recipe_is_refused(capsys):
    with pytest.raises(SystemExit):
        fg.parse_config(["--recipe", "geneval-fast"])
    assert "invalid choice" in capsys.readouterr().err


def test_default_beta_per_reward_is_the_reference_configs():
    # config/grpo.py: general_ocr_sd3 and geneval_sd3 0.04, pickscore_sd3 0.01, clipscore_sd3 0.02
    beta = {r: fg.Config(reward=r).resolved_beta() for r in ("ocr", "geneval", "pickscore", "clipscore")}
    assert beta == {"ocr": 0.04, "geneval": 0.04, "pickscore": 0.01, "clipscore": 0.02}
