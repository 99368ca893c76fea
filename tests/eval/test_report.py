"""The markdown report names what it measured: the passkey scorer and the one it was checked against."""

from ropekit.eval.runner import markdown_report


def results_with_passkey(scorer: str) -> dict:
    config = {"model": "m", "tasks": ["passkey"], "seed": 0}
    passkey = {"accuracy": {"256@0": 1.0, "256@1": 0.0}, "scorer": scorer, "trials": 2}
    passkey |= {"agreement": 0.75, "agreement_trials": 4}
    return {"config": config, "ropekit_version": "0", "methods": {"none": {"passkey": passkey}}}


def test_passkey_line_names_the_scorer_and_the_other_one_it_agrees_with():
    generation = markdown_report(results_with_passkey("generation"), [], [])
    assert (
        "mean accuracy 50% (generation, 2 trials per cell; agreement with the teacher-forced scorer 75%" in generation
    )
    forced = markdown_report(results_with_passkey("teacher-forced"), [], [])
    assert "(teacher-forced, 2 trials per cell; agreement with the generation scorer 75% on 4 trials)" in forced
