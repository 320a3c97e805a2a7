"""Built-in trainer environments: rewards, termination, bad actions, the random-policy rate."""

import random

import pytest

from steppo_fast.trainer import envs
from steppo_fast.trainer.envs import lights


def _play(env, policy, seed):
    obs = env.reset(seed)
    steps, total = 0, 0.0
    while True:
        obs, reward, done = env.step(policy(obs))
        steps += 1
        total += reward
        if done:
            return steps, total, obs


def test_registry_and_protocol():
    assert envs.names() == ["hotpot", "lights"]
    for name in envs.names():
        assert isinstance(envs.make_env(name), envs.Environment)
    with pytest.raises(ValueError, match="unknown environment 'maze'; choose one of: hotpot, lights"):
        envs.make_env("maze")


def test_lights_right_answers_win_and_one_wrong_answer_loses():
    env = envs.make_env("lights")
    right = {"light red": "stop", "light green": "go"}
    for seed in range(50):
        steps, total, last = _play(env, lambda o: right[o.split("; ")[-1]], seed)
        assert 3 <= steps <= 8 and total == 1.0 and last == ""
    # Wrong on the first turn only: the episode runs to its end and pays nothing.
    obs = env.reset(7)
    first = True
    while True:
        answer = {"light red": "stop", "light green": "go"}[obs.split("; ")[-1]]
        if first:
            answer = "go" if answer == "stop" else "stop"
            first = False
        obs, reward, done = env.step(answer)
        if done:
            assert reward == 0.0
            break
        assert reward == 0.0  # sparse: nothing before the end


def test_lights_bad_action_is_a_penalty_observation_not_a_crash():
    env = envs.make_env("lights")
    env.reset(3)
    obs, reward, done = env.step("fly away!!")
    assert obs.startswith("invalid answer; light ") and reward == 0.0 and not done
    obs, reward, done = env.step("")  # episodes have at least 3 turns: this is not the last
    assert obs.startswith("invalid answer; light ") and not done


def test_lights_random_policy_success_rate():
    p = lights.random_success_probability()
    assert 0.05 <= p <= 0.20 and abs(p - 0.0606) < 1e-3  # hand value: sum_K P(K) 2^-K
    rng = random.Random(0)
    env = envs.make_env("lights")
    wins = sum(_play(env, lambda o: rng.choice(("go", "stop")), seed)[1] for seed in range(4000))
    assert abs(wins / 4000 - p) < 0.015  # 3.7 standard errors
    lengths = {_play(env, lambda o: "go", seed)[0] for seed in range(300)}
    assert lengths == set(range(3, 9))  # variable length, 3-8 turns


def test_hotpot_multi_hop_search_then_answer():
    env = envs.make_env("hotpot", kb_seed=1)
    for seed in range(40):
        q = env.reset(seed)
        person = next(w for w in q.split() if w in env.person_city)
        obs, r, done = env.step(f"search {person}")
        city = obs.split()[-1]
        assert obs == f"result {person} was born in {city}" and not done and r == 0.0
        obs, _, _ = env.step(f"search {city}")
        country = obs.split()[-1]
        if "language" in q:  # three hops
            obs, _, _ = env.step(f"search {country}")
            target = obs.split()[-1]
        else:
            target = country
        obs, reward, done = env.step(f"answer {target}")
        assert done and reward == 1.0


def test_hotpot_wrong_answer_bad_actions_and_turn_limit():
    env = envs.make_env("hotpot", kb_seed=1, max_steps=4)
    env.reset(0)
    assert env.step("answer atlantis") == envs.StepResult("", 0.0, True)
    env.reset(0)
    obs, r, done = env.step("dance")
    assert obs.startswith("invalid action") and r == 0.0 and not done
    obs, r, done = env.step("search nobody")
    assert obs == "result nothing found for nobody" and not done
    env.step("search ann")
    obs, r, done = env.step("search bob")  # the fourth turn without an answer ends it
    assert done and r == 0.0
    with pytest.raises(RuntimeError, match="reset"):
        env.step("answer x")
    with pytest.raises(ValueError, match="max_steps"):
        envs.make_env("hotpot", max_steps=2)
