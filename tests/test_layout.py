import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from episodes import make_episodes, packed, step_rows
from steppo_fast import StepLayout


def test_step_rows_hand_example():
    # Trajectory 5: rows 1 (k=0) and 0 (k=1); trajectory 7: rows 2 (k=0) and 3 (k=1).
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    lay = StepLayout.from_step_rows(mask, torch.tensor([5, 5, 7, 7]), torch.tensor([1, 0, 0, 1]),
                                    torch.tensor([3, 3, 1, 1]))
    assert lay.num_steps == 4 and lay.num_trajectories == 2 and lay.num_groups == 2
    assert lay.token_step.tolist() == [1, 1, -1, 0, -1, -1, -1, 2, 2, 3, 3, 3]
    assert lay.step_traj.tolist() == [0, 0, 1, 1]
    assert lay.step_pos.tolist() == [0, 1, 0, 1]
    assert lay.traj_step_offsets.tolist() == [0, 2, 4]
    assert lay.traj_ids.tolist() == [5, 7]
    assert lay.group_ids.tolist() == [1, 3] and lay.traj_group.tolist() == [1, 0]
    assert lay.step_tokens.tolist() == [3, 0, 1, 7, 8, 9, 10, 11]
    assert lay.step_token_offsets.tolist() == [0, 1, 3, 5, 8]
    assert lay.row_step.tolist() == [1, 0, 2, 3]
    assert lay.step_num_tokens.tolist() == [1, 2, 2, 3]


def test_packed_hand_example():
    sid = torch.tensor([[-1, 0, 0, -1, 1, -1], [-1, -1, 0, 0, 0, -1]])
    lay = StepLayout.from_packed(sid, torch.tensor([4, 4]))
    assert lay.num_steps == 3 and lay.num_trajectories == 2 and lay.num_groups == 1
    assert lay.token_step.tolist() == [-1, 0, 0, -1, 1, -1, -1, -1, 2, 2, 2, -1]
    assert lay.step_traj.tolist() == [0, 0, 1] and lay.step_pos.tolist() == [0, 1, 0]
    assert lay.step_tokens.tolist() == [1, 2, 4, 8, 9, 10]
    assert lay.traj_group.tolist() == [0, 0]


def test_step_without_tokens_is_legal():
    mask = torch.tensor([[1, 1], [0, 0], [1, 0]], dtype=torch.bool)
    lay = StepLayout.from_step_rows(mask, torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]))
    assert lay.step_num_tokens.tolist() == [2, 0, 1]
    sid = torch.tensor([[0, 0, -1, 2]])
    lay2 = StepLayout.from_packed(sid, num_steps=torch.tensor([3]))
    assert lay2.step_num_tokens.tolist() == [2, 0, 1]


def test_step_values_from_tokens_reads_first_agent_token():
    mask = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    lay = StepLayout.from_step_rows(mask, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]))
    vals = torch.arange(9, dtype=torch.float32).view(3, 3)
    assert lay.step_values_from_tokens(vals).tolist() == [1.0, 0.0, 6.0]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_traj=st.integers(1, 12), group=st.integers(1, 4))
def test_both_layouts_agree(seed, n_traj, group):
    ep = make_episodes(seed, n_traj, group_size=group)
    mask, traj, step, grp, rew_rows = step_rows(ep, seed)
    sid, g, k, rew_packed = packed(ep)
    a = StepLayout.from_step_rows(mask, traj, step, grp)
    b = StepLayout.from_packed(sid, g, num_steps=k)
    for name in ("step_traj", "step_pos", "traj_step_offsets", "traj_group", "group_ids", "step_token_offsets"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.num_active_tokens == b.num_active_tokens
    # The same tokens land in the same steps, in the same order.
    ra = rew_rows.reshape(-1)[a.step_tokens]
    rb = rew_packed.reshape(-1)[b.step_tokens]
    assert torch.equal(ra, rb)


def _rows():
    return torch.ones(3, 2, dtype=torch.bool), torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0])


@pytest.mark.parametrize("steps,kind", [([0, 2, 0], "gap in step indices"), ([0, 0, 0], "duplicate step index"),
                                        ([1, 2, 0], "gap in step indices")])
def test_step_rows_gap_or_duplicate_names_trajectory(steps, kind):
    m, t, _ = _rows()
    with pytest.raises(ValueError, match=rf"trajectory 0: {kind}"):
        StepLayout.from_step_rows(m, torch.tensor([0, 0, 1]), torch.tensor(steps))


def test_step_rows_errors_name_the_argument():
    m, t, k = _rows()
    with pytest.raises(ValueError, match=r"trajectory_id must have shape \(B,\)"):
        StepLayout.from_step_rows(m, t[:2], k)
    with pytest.raises(ValueError, match="step_index must have shape"):
        StepLayout.from_step_rows(m, t, torch.tensor([0, 1, 0, 0]))
    with pytest.raises(ValueError, match="trajectory_id must be non-negative: row 2"):
        StepLayout.from_step_rows(m, torch.tensor([0, 0, -1]), k)
    with pytest.raises(ValueError, match="step_index must be non-negative"):
        StepLayout.from_step_rows(m, t, torch.tensor([0, -1, 0]))
    with pytest.raises(ValueError, match="group_id must be non-negative"):
        StepLayout.from_step_rows(m, t, k, torch.tensor([0, 0, -2]))
    with pytest.raises(ValueError, match="trajectory_id must have an integer dtype"):
        StepLayout.from_step_rows(m, t.float(), k)
    with pytest.raises(ValueError, match="step_index must have an integer dtype"):
        StepLayout.from_step_rows(m, t, k.double())
    with pytest.raises(TypeError, match="trajectory_id must be a torch.Tensor"):
        StepLayout.from_step_rows(m, [0, 0, 1], k)
    with pytest.raises(ValueError, match="empty batch"):
        StepLayout.from_step_rows(torch.zeros(0, 4, dtype=torch.bool), torch.zeros(0, dtype=torch.long),
                                  torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"response_mask must have shape \(B, T\)"):
        StepLayout.from_step_rows(torch.ones(3, dtype=torch.bool), t, k)
    with pytest.raises(ValueError, match="trajectory 0: its rows carry different group_id"):
        StepLayout.from_step_rows(m, t, k, torch.tensor([0, 1, 1]))


def test_validate_false_skips_checks():
    m, t, _ = _rows()
    lay = StepLayout.from_step_rows(m, t, torch.tensor([0, 0, 0]), validate=False)
    assert lay.num_steps == 3  # garbage in, no error, no crash


def test_packed_errors():
    with pytest.raises(ValueError, match="trajectory 1: gap in step indices, step 1 has no agent token"):
        StepLayout.from_packed(torch.tensor([[0, 1, -1], [0, -1, 2]]))
    with pytest.raises(ValueError, match="trajectory 0: step ids go backwards"):
        StepLayout.from_packed(torch.tensor([[0, 1, 0], [0, -1, -1]]))
    with pytest.raises(ValueError, match="trajectory 0: step_ids must be -1"):
        StepLayout.from_packed(torch.tensor([[0, -3, -1]]))
    with pytest.raises(ValueError, match="step_ids must have an integer dtype"):
        StepLayout.from_packed(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"group_id must have shape \(B,\)"):
        StepLayout.from_packed(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match="empty batch"):
        StepLayout.from_packed(torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="trajectory 0: step id 2 is not below num_steps = 2"):
        StepLayout.from_packed(torch.tensor([[0, 1, 2]]), num_steps=torch.tensor([2]))
    with pytest.raises(ValueError, match="group_id must be non-negative: trajectory 1"):
        StepLayout.from_packed(torch.tensor([[0], [0]]), torch.tensor([0, -1]))


# ------------------------------------------------------------------ turns from the mask
def test_turns_hand_example():
    # Row 0: prompt, turn 0 (2 tokens), tool (1), turn 1 (1 token), padding.
    # Row 1: turn 0 (3 tokens) cut in two by step_starts at column 2, tool, turn 2.
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 1, 0, 1, 1]])
    starts = torch.zeros(2, 6, dtype=torch.bool)
    starts[1, 2] = True
    starts[0, 0] = True  # off the mask: ignored
    lay = StepLayout.from_turns(mask, torch.tensor([9, 9]), step_starts=starts)
    assert lay.token_step.tolist() == [-1, 0, 0, -1, 1, -1, 2, 2, 3, -1, 4, 4]
    assert lay.num_steps == 5 and lay.num_trajectories == 2 and lay.num_groups == 1
    assert lay.step_traj.tolist() == [0, 0, 1, 1, 1]
    assert lay.step_pos.tolist() == [0, 1, 0, 1, 2]
    assert lay.step_num_tokens.tolist() == [2, 1, 2, 1, 2]
    from steppo_fast.layout import step_ids_from_turns

    assert step_ids_from_turns(mask).tolist() == [[-1, 0, 0, -1, 1, -1], [0, 0, 0, -1, 1, 1]]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_traj=st.integers(1, 12), group=st.integers(1, 4))
def test_turns_equal_packed_when_turns_are_separated(seed, n_traj, group):
    ep = make_episodes(seed, n_traj, group_size=group, allow_empty_steps=False)
    sid, g, k, _ = packed(ep)
    a = StepLayout.from_packed(sid, g, num_steps=k)
    for mask in (sid >= 0, (sid >= 0).float(), (sid >= 0).to(torch.int32)):
        b = StepLayout.from_turns(mask, g)
        for name in ("token_step", "step_traj", "step_pos", "traj_step_offsets", "traj_group", "group_ids",
                     "step_token_offsets", "step_tokens"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_turns_adjacent_steps_need_step_starts():
    sid = torch.tensor([[-1, 0, 0, 1, 1, 1, -1, 2]])
    starts = torch.zeros_like(sid, dtype=torch.bool)
    starts[0, 3] = True
    lay = StepLayout.from_turns(sid >= 0, step_starts=starts)
    ref = StepLayout.from_packed(sid)
    assert torch.equal(lay.token_step, ref.token_step)
    assert StepLayout.from_turns(sid >= 0).num_steps == 2  # without the marker the runs merge


def test_turns_errors_name_the_argument():
    with pytest.raises(ValueError, match="row 1: response_mask has no agent token"):
        StepLayout.from_turns(torch.tensor([[1, 0], [0, 0]]))
    lay = StepLayout.from_turns(torch.tensor([[1, 0], [0, 0]]), validate=False)
    assert lay.num_steps == 1 and lay.traj_num_steps.tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"response_mask must have shape \(B, T\)"):
        StepLayout.from_turns(torch.ones(3))
    with pytest.raises(TypeError, match="response_mask must be a torch.Tensor"):
        StepLayout.from_turns([[1, 0]])
    with pytest.raises(ValueError, match="step_starts must have the shape of response_mask"):
        StepLayout.from_turns(torch.ones(2, 3), step_starts=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"group_id must have shape \(B,\)"):
        StepLayout.from_turns(torch.ones(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="group_id must be non-negative: row 0"):
        StepLayout.from_turns(torch.ones(2, 3), torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="response_mask must be bool, integer or float"):
        StepLayout.from_turns(torch.ones(2, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="empty batch"):
        StepLayout.from_turns(torch.ones(0, 3))
