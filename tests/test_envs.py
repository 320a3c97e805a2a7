"""Built-in trainer environments: rewards, termination, bad actions, the random-policy rate."""

import random

import pytest

from steppo_fast.trainer import envs
from steppo_fast.trainer.envs import lights, relay


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
    assert envs.names() == ["hotpot", "lights", "relay"]
    for name in envs.names():
        assert isinstance(envs.make_env(name), envs.Environment)
    with pytest.raises(ValueError, match="unknown environment 'maze'; choose one of: hotpot, lights, relay"):
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


def _right(obs):
    return relay.CALLS[obs.split()[-1]]


def _other(call):
    return {"stop": "go", "go": "stop"}[call]


THINK = "hmm so well then"


def test_relay_right_calls_win_in_m_turns_and_one_miss_is_allowed():
    env = envs.make_env("relay")
    turns = set()
    for seed in range(60):
        obs = env.reset(seed)
        assert obs in ("light red", "light green")
        need = env._need
        for t in range(need):
            obs, reward, done = env.step(f"{_right(obs)} {THINK}")
            assert done == (t == need - 1) and reward == (1.0 if done else 0.0)
            if not done:
                assert obs.startswith("right light ")
        turns.add(need)
    assert turns == {3, 4, 5, 6, 7}
    # One miss (on the first turn), then right calls: success after m + 1 turns.
    obs = env.reset(4)
    need = env._need
    obs, reward, done = env.step(f"{THINK} {_other(_right(obs))}")
    assert obs.startswith("wrong light ") and reward == 0.0 and not done
    for t in range(need):
        obs, reward, done = env.step(f"{THINK} {_right(obs)}")
        assert done == (t == need - 1)
    assert reward == 1.0


def test_relay_two_misses_run_to_the_turn_limit_and_pay_nothing():
    env = envs.make_env("relay", calls=(3,))
    assert env.max_steps == 4
    obs = env.reset(0)
    steps = []
    for t in range(4):  # miss, miss, right, right: 4 = m + 1 turns, the limit, reward 0
        call = _right(obs) if t >= 2 else _other(_right(obs))
        obs, reward, done = env.step(f"{THINK} {call}")
        steps.append((reward, done))
    assert steps == [(0.0, False), (0.0, False), (0.0, False), (0.0, True)] and obs == ""
    with pytest.raises(RuntimeError, match="reset"):
        env.step(f"{THINK} go")


def test_relay_the_first_call_binds_and_a_response_without_a_call_is_a_miss():
    env = envs.make_env("relay", calls=(3,))
    env.reset(1)
    env._lights = ["red", "green", "red", "green"]  # fix the lights for hand-written checks
    assert env.judge("hmm stop go go go") == "right" and env.judge("go stop stop stop") == "wrong"
    assert env.judge("fly away stop go") == "right"  # unknown words count as thought
    assert env.judge("hmm so well then") == env.judge("") == "none"
    obs, r, done = env.step("go stop stop")  # the first call, go, is wrong for red
    assert obs == "wrong light green" and r == 0.0 and not done
    obs, r, done = env.step(THINK)  # no call word: the second miss
    assert obs == "no call light red" and not done
    obs, r, done = env.step(f"{THINK} stop")
    assert obs == "right light green" and not done
    assert env.step("") == envs.StepResult("", 0.0, True)  # the turn limit (m + 1 = 4 turns), unpaid
    assert env.end_of_step is False and env.max_action_words == 40
    with pytest.raises(ValueError, match="calls"):
        envs.make_env("relay", calls=())
    with pytest.raises(ValueError, match="budgets"):
        envs.make_env("relay", budgets=(8, 4))


def test_relay_token_budgets_vary_per_turn_and_follow_the_task_seed():
    env = envs.make_env("relay")
    seen = []
    for seed in range(300):
        env.reset(seed)
        budgets = []
        while True:
            budgets.append(env.response_budget)
            _, _, done = env.step(f"go {THINK}")
            if done:
                break
        seen += budgets
        again = envs.make_env("relay")
        again.reset(seed)
        assert again.response_budget == budgets[0]  # the same task gives the same budgets
    assert min(seen) == 8 and max(seen) == 40 and len(set(seen)) == 33
    assert abs(sum(seen) / len(seen) - 24) < 1.0  # uniform on 8..40


def test_relay_random_policies_match_their_hand_computed_success():
    # By hand: mean over m = 3..7 of (m + 2) / 2^(m + 1) for a uniformly random call.
    p_half = relay.success_probability(0.5)
    assert abs(p_half - (5 / 16 + 6 / 32 + 7 / 64 + 8 / 128 + 9 / 256) / 5) < 1e-12 and 0.05 <= p_half <= 0.20
    # Uniform words: no call only when all B words are thought words, (4/6)^B; B uniform on 8..40.
    p_call = sum(1 - (4 / 6) ** b for b in range(8, 41)) / 33 / 2
    assert abs(relay.uniform_token_call_probability() - p_call) < 1e-12
    p_uniform = relay.success_probability(p_call)
    assert 0.05 < p_uniform < p_half
    rng = random.Random(0)
    env = envs.make_env("relay")
    words = list(relay.RelayEnv.action_words)
    n = 4000

    def well_formed(obs):
        call = rng.choice(relay.CALL_WORDS)
        return " ".join([*(rng.choice(relay.THOUGHT_WORDS) for _ in range(env.response_budget - 1)), call])

    def uniform_tokens(obs):  # what an untrained model with the restricted head samples
        return " ".join(rng.choice(words) for _ in range(env.response_budget))

    for policy, p in ((well_formed, p_half), (uniform_tokens, p_uniform)):
        wins = sum(_play(env, policy, seed)[1] for seed in range(n))
        sd = (p * (1 - p) / n) ** 0.5
        assert abs(wins / n - p) < 4 * sd, (policy.__name__, wins / n, p)
    lengths = {_play(env, well_formed, seed)[0] for seed in range(400)}
    assert lengths == set(range(3, 9))  # 3-8 turns
