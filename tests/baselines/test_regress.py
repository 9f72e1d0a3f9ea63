from .common import fit_and_check


def test_regress_beats_chance_and_round_trips(tiny_bench, chance, tmp_path):
    fit_and_check("regress", {"epochs": 30, "hidden": 128, "depth": 1, "lr": 3e-3}, tiny_bench, chance,
                  tmp_path)


def test_regress_mse_loss(tiny_bench, chance, tmp_path):
    fit_and_check("regress", {"epochs": 30, "hidden": 128, "depth": 1, "lr": 3e-3, "loss": "mse"},
                  tiny_bench, chance, tmp_path)
