from fedrecon.core.data_split import build_batch_schedule, has_held_out_batch


def test_split_gives_even_batches_to_reconstruction_and_odd_to_training() -> None:
    s = build_batch_schedule(7, split_dataset=True, recon_epochs=1, recon_steps_max=None,
                             post_recon_epochs=1, post_recon_steps_max=None)
    assert s.reconstruction == (0, 2, 4, 6)
    assert s.post_reconstruction == (1, 3, 5)
    assert not set(s.reconstruction) & set(s.post_reconstruction)


def test_epochs_repeat_and_caps_truncate() -> None:
    s = build_batch_schedule(5, split_dataset=True, recon_epochs=3, recon_steps_max=7,
                             post_recon_epochs=2, post_recon_steps_max=3)
    assert s.reconstruction == (0, 2, 4, 0, 2, 4, 0)
    assert s.post_reconstruction == (1, 3, 1)


def test_without_split_both_phases_read_every_batch() -> None:
    s = build_batch_schedule(3, split_dataset=False, recon_epochs=1, recon_steps_max=None,
                             post_recon_epochs=1, post_recon_steps_max=2)
    assert s.reconstruction == (0, 1, 2)
    assert s.post_reconstruction == (0, 1)


def test_single_batch_client_has_nothing_to_train_on_when_split() -> None:
    s = build_batch_schedule(1, split_dataset=True, recon_epochs=5, recon_steps_max=50,
                             post_recon_epochs=1, post_recon_steps_max=50)
    assert s.reconstruction == (0, 0, 0, 0, 0)
    assert s.post_reconstruction == ()


def test_held_out_batch_needs_a_second_batch_with_the_split() -> None:
    assert not has_held_out_batch(5, batch_size=5, split_dataset=True)  # one batch: reconstruction only
    assert has_held_out_batch(6, batch_size=5, split_dataset=True)
    assert has_held_out_batch(1, batch_size=5, split_dataset=False)
    assert not has_held_out_batch(0, batch_size=5, split_dataset=False)
