"""Secure aggregation (fedrecon.core.secagg): the sum is right, dropouts are recovered up to the threshold
and fail cleanly below it, a masked update looks uniform, hostile messages are refused by type, and the
coordinator's object never holds an individual's unmasked update."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import subprocess
import sys
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from fedrecon.core.secagg import (
    BadShareCiphertext,
    InconsistentRequest,
    InconsistentReveal,
    MalformedMessage,
    NotANeighbour,
    Quantiser,
    RecoveryFailed,
    RoundParameters,
    SecAggClient,
    SecAggServer,
    ServerStage,
    TooFewNeighbours,
    TooFewSurvivors,
    UnknownClient,
    WrongStage,
    build_parameters,
    crypto,
    neighbourhoods,
    recommended_degree,
)
from fedrecon.core.secagg.graph import ring_order
from fedrecon.core.secagg.local import DropoutPlan, local_round, secure_sum
from fedrecon.core.secagg.messages import (
    EncryptedShare,
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    UnmaskRequest,
)


def seeded_entropy(label: int) -> Callable[[int], bytes]:
    """Deterministic stand-in for os.urandom, so a statistical test gives the same verdict every run."""
    counter = itertools.count()
    return lambda n: hashlib.shake_256(f"test entropy {label} {next(counter)}".encode()).digest(n)


Arrays = dict[int, np.ndarray]


def make_round(n: int, d: int, *, degree: int | None = None, clip: float = 1.0, seed: int = 0
               ) -> tuple[RoundParameters, dict[int, SecAggClient], Arrays, Arrays]:
    """Parameters, clients with seeded secrets, float updates in [-clip, clip] and their quantisations."""
    p = build_parameters(round_id=b"task/round-1", clients=range(1, n + 1), vector_length=d, clip=clip,
                         degree=degree if degree is not None else n - 1, graph_seed=b"graph seed")
    clients = {c: SecAggClient(c, p, entropy=seeded_entropy(1000 * seed + c)) for c in p.clients}
    rng = np.random.default_rng(seed)
    updates = {c: rng.uniform(-clip, clip, d) for c in p.clients}
    quantised = {c: p.quantiser.quantise(updates[c], np.random.default_rng([seed, c])) for c in p.clients}
    return p, clients, updates, quantised


def check_sum(result_total: np.ndarray, survivors: frozenset[int], p: RoundParameters,
              updates: dict[int, np.ndarray], quantised: dict[int, np.ndarray]) -> None:
    exact = sum(quantised[c].astype(np.int64) for c in survivors)
    np.testing.assert_array_equal(result_total.astype(np.int64), exact)
    floats = p.quantiser.dequantise_sum(result_total, len(survivors))
    plain = sum(updates[c] for c in survivors)
    assert np.max(np.abs(floats - plain)) <= p.quantiser.error_bound(len(survivors))


# -- quantisation ----------------------------------------------------------------------------------

def test_quantiser_levels_headroom_and_hand_checked_values() -> None:
    q = Quantiser(clip=2.0, max_clients=4)
    assert q.levels == (2**32 - 1) // 4 == 1_073_741_823  # 4 clients at the top still sum below 2^32
    rng = np.random.default_rng(0)
    ends = q.quantise(np.array([-2.0, 2.0, -9.0, 9.0]), rng)
    np.testing.assert_array_equal(ends, [0, q.levels, 0, q.levels])
    # The sum of 4 clients at +2 dequantises to 8 exactly; 4 at -2 to -8.
    assert q.dequantise_sum(np.array([4 * q.levels], dtype=np.uint64), 4)[0] == pytest.approx(8.0)
    assert q.dequantise_sum(np.array([0]), 4)[0] == -8.0
    # Stochastic rounding is unbiased: 0.5 level above an integer rounds up about half the time.
    half = (q.levels // 2 + 0.5) * q.step - 2.0  # exactly between two levels
    ups = q.quantise(np.full(100_000, half), np.random.default_rng(1)) - q.levels // 2
    assert set(np.unique(ups)) == {0, 1} and abs(ups.mean() - 0.5) < 0.01
    assert q.error_bound(4) == pytest.approx(4 * 4.0 / q.levels)
    with pytest.raises(ValueError, match="non-finite"):
        q.quantise(np.array([np.nan]), rng)


# -- the protocol ----------------------------------------------------------------------------------

def test_the_unmasked_sum_equals_the_plaintext_sum_within_the_quantisation_error() -> None:
    p, clients, updates, quantised = make_round(8, 300)
    result = local_round(p, quantised.__getitem__, clients=clients)
    assert result.survivors == frozenset(range(1, 9)) and not result.dropped
    check_sum(result.total, result.survivors, p, updates, quantised)


def test_secure_sum_of_hand_checkable_updates() -> None:
    p = build_parameters(round_id=b"r", clients=[1, 2, 3, 4], vector_length=3, clip=1.0)
    updates = {1: np.array([0.5, -1.0, 0.25]), 2: np.array([0.5, 1.0, 0.25]), 3: np.array([-0.25, 0.0, 3.0]),
               4: np.array([9.0, 9.0, 9.0])}  # 3's last value and all of 4's are clipped to 1; 4 drops
    total, result = secure_sum(updates, p, np.random.default_rng(0),
                               dropouts=DropoutPlan(before_masked_input=[4]))
    assert result.survivors == frozenset({1, 2, 3}) and (p.degree, p.threshold) == (3, 2)
    np.testing.assert_allclose(total, [0.75, 0.0, 1.5], atol=p.quantiser.error_bound(3))
    assert p.quantiser.error_bound(3) == pytest.approx(3 * 2 / 1_073_741_823)  # 3 · 2c / ⌊(2^32 − 1) / 4⌋


def test_neighbourhoods_are_symmetric_k_regular_and_of_logarithmic_size() -> None:
    graph = neighbourhoods(list(range(1, 41)), 8, b"seed")
    assert all(len(ns) == 8 and c not in ns for c, ns in graph.items())
    assert all(c in graph[v] for c, ns in graph.items() for v in ns)
    assert neighbourhoods([1, 2, 3], 8, b"seed") == {1: (2, 3), 2: (1, 3), 3: (1, 2)}  # the full graph
    small, large = recommended_degree(100), recommended_degree(1000)
    assert (small, large) == (99, 134)  # 100 clients at 30% dropout need the full graph; 1,000 need 134

    def p_short(k: int) -> float:  # P[fewer than ⌊k/2⌋ + 1 of k neighbours survive at 70%], exactly
        return sum(math.comb(k, s) * 0.7**s * 0.3 ** (k - s) for s in range(k // 2 + 1))

    assert 1000 * p_short(134) <= 1e-3 < 1000 * p_short(132)  # the smallest even k within the budget
    assert recommended_degree(10_000) < 2 * large  # grows like log n, not n


def thirty_percent_on_the_ring(p: RoundParameters) -> list[int]:
    """Every position ≡ 0, 3, 6 (mod 10) of the public ring: 30%, spread so each neighbourhood of 16
    loses at most 6 and keeps at least 10 ≥ t = 9."""
    return [c for i, c in enumerate(ring_order(p.clients, p.graph_seed)) if i % 10 in (0, 3, 6)]


def test_thirty_percent_dropping_after_the_masking_stage_are_recovered_on_a_sparse_graph() -> None:
    p, clients, updates, quantised = make_round(40, 200, degree=16, seed=1)
    assert (p.degree, p.threshold) == (16, 9)
    gone = thirty_percent_on_the_ring(p)
    assert len(gone) == 12
    result = local_round(p, quantised.__getitem__, clients=clients,
                         dropouts=DropoutPlan(before_masked_input=gone))
    assert result.dropped == frozenset(gone) and result.count == 28
    check_sum(result.total, result.survivors, p, updates, quantised)


def test_survivors_silent_in_the_unmasking_stage_are_still_in_the_sum() -> None:
    p, clients, updates, quantised = make_round(10, 100, seed=2)  # full graph: k = 9, t = 5
    result = local_round(p, quantised.__getitem__, clients=clients,
                         dropouts=DropoutPlan(before_masked_input=[1, 2], before_unmasking=[3, 4]))
    # 3 and 4 masked, then vanished: their self-mask seeds come from 6 answers, each other survivor's from 5.
    assert result.survivors == frozenset(range(3, 11))
    check_sum(result.total, result.survivors, p, updates, quantised)


def count_combines(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = crypto.combine_shares
    monkeypatch.setattr(crypto, "combine_shares", lambda shares: calls.append(1) or original(shares))
    return calls


def test_too_few_survivors_fail_before_unmasking(monkeypatch: pytest.MonkeyPatch) -> None:
    p, clients, _, quantised = make_round(10, 50, seed=3)  # min_survivors = t = 5
    combines = count_combines(monkeypatch)
    server = SecAggServer(p)
    with pytest.raises(TooFewSurvivors, match="4 masked inputs"):
        local_round(p, quantised.__getitem__, clients=clients, server=server,
                    dropouts=DropoutPlan(before_masked_input=[1, 2, 3, 4, 5, 6]))
    assert server.stage is ServerStage.FAILED and combines == []


def test_dropouts_beyond_the_threshold_fail_cleanly_and_reconstruct_nothing(monkeypatch: pytest.MonkeyPatch
                                                                            ) -> None:
    p, clients, _, quantised = make_round(10, 50, seed=4)  # t = 5
    combines = count_combines(monkeypatch)
    server = SecAggServer(p)
    # 7 masked inputs arrive (enough for a sum), but only 4 survivors answer: every secret has 4 < 5 shares.
    with pytest.raises(RecoveryFailed, match="fewer than 5 shares"):
        local_round(p, quantised.__getitem__, clients=clients, server=server,
                    dropouts=DropoutPlan(before_masked_input=[1, 2, 3], before_unmasking=[4, 5, 6]))
    assert server.stage is ServerStage.FAILED and combines == []
    # And no owner ever had shares of both its secrets revealed.
    assert not set(server._self_seed_shares) & set(server._mask_seed_shares)


# -- what a masked update looks like ---------------------------------------------------------------

CRITICAL_63_DF_0_001 = 103.442  # scipy.stats.chi2.ppf(0.999, 63): the test rejects uniformity at α = 0.001


def chi_square_top_bits(values: np.ndarray) -> float:
    counts = np.bincount((values >> np.uint32(26)).astype(np.int64), minlength=64)  # 64 buckets of 2^26
    expected = len(values) / 64
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_masked_update_is_indistinguishable_from_uniform_and_the_test_can_tell() -> None:
    p, clients, _, quantised = make_round(5, 64 * 200, seed=5)
    server = SecAggServer(p)
    seen: list[np.ndarray] = []
    receive = server.receive_masked_input
    server.receive_masked_input = lambda m: (seen.append(m.values.copy()), receive(m))[1]  # type: ignore[method-assign]
    local_round(p, quantised.__getitem__, clients=clients, server=server)
    assert chi_square_top_bits(seen[0]) < CRITICAL_63_DF_0_001  # client 1's masked input: uniform
    assert chi_square_top_bits(quantised[1]) > 100 * CRITICAL_63_DF_0_001  # its plain encoding: not at all


# -- hostile clients -------------------------------------------------------------------------------

def test_a_wrong_length_masked_input_is_refused_and_the_round_goes_on() -> None:
    p, clients, updates, quantised = make_round(8, 100, seed=6)
    server = SecAggServer(p)
    receive = server.receive_masked_input
    refusals: list[Exception] = []

    def hostile_or_not(message: MaskedInput) -> None:
        if message.sender == 2:
            wrong = r"uint32 of shape \(100,\), not uint32 of shape \(99,\)"
            with pytest.raises(MalformedMessage, match=wrong) as refused:
                receive(MaskedInput(2, message.values[:99]))
            refusals.append(refused.value)
            with pytest.raises(MalformedMessage, match="not float32"):
                receive(MaskedInput(2, message.values.astype(np.float32)))
            return
        receive(message)

    server.receive_masked_input = hostile_or_not  # type: ignore[method-assign]
    result = local_round(p, quantised.__getitem__, clients=clients, server=server)
    assert refusals and result.dropped == frozenset({2})
    check_sum(result.total, result.survivors, p, updates, quantised)

    late = SecAggServer(p)
    with pytest.raises(WrongStage, match="a MASK message is not taken"):
        late.receive_masked_input(MaskedInput(1, quantised[1]))


def test_shares_for_a_non_neighbour_are_refused_and_the_round_goes_on() -> None:
    p, clients, updates, quantised = make_round(20, 60, degree=8, seed=7)
    outsider = next(c for c in p.clients if c != 1 and c not in p.neighbours[1])
    server = SecAggServer(p)
    receive = server.receive_shares

    def hostile_or_not(message: EncryptedShares) -> None:
        if message.sender == 1:
            bad = (*message.shares, EncryptedShare(1, outsider, message.shares[0].ciphertext))
            with pytest.raises(NotANeighbour, match=f"\\[{outsider}\\], which are not its"):
                receive(EncryptedShares(1, bad))
            with pytest.raises(MalformedMessage, match="exactly one share to each"):
                receive(EncryptedShares(1, message.shares[1:]))
            return  # client 1 is out from here on; its neighbours' deliveries simply lack it
        receive(message)

    receive_masked = server.receive_masked_input

    def cannot_come_back(message: MaskedInput) -> None:
        with pytest.raises(UnknownClient, match="client 1 is not"):
            receive_masked(MaskedInput(1, np.zeros(60, dtype=np.uint32)))
        receive_masked(message)

    server.receive_shares = hostile_or_not  # type: ignore[method-assign]
    server.receive_masked_input = cannot_come_back  # type: ignore[method-assign]
    result = local_round(p, quantised.__getitem__, clients=clients, server=server)
    assert 1 not in result.survivors and result.count == 19
    check_sum(result.total, result.survivors, p, updates, quantised)


def test_a_bad_ciphertext_is_set_aside_by_its_recipient_and_the_round_recovers_the_sender() -> None:
    p, clients, updates, quantised = make_round(8, 80, seed=8)  # k = 7, t = 4
    server = SecAggServer(p)
    receive = server.receive_shares

    def tamper(message: EncryptedShares) -> None:
        if message.sender == 3:  # client 3 sends client 5 garbage, then drops after sharing
            shares = tuple(dataclasses.replace(s, ciphertext=bytes(len(s.ciphertext)))
                           if s.recipient == 5 else s for s in message.shares)
            message = EncryptedShares(3, shares)
        receive(message)

    server.receive_shares = tamper  # type: ignore[method-assign]
    result = local_round(p, quantised.__getitem__, clients=clients, server=server,
                         dropouts=DropoutPlan(before_masked_input=[3]))
    assert isinstance(clients[5].rejected[3], BadShareCiphertext) and clients[5].rejected[3].sender == 3
    assert result.complaints == {5: (3,)}  # the coordinator is told who sent it
    check_sum(result.total, result.survivors, p, updates, quantised)  # 3's masks came from 6 other shares


def test_a_corrupted_revealed_share_is_detected_and_routed_around() -> None:
    p, clients, updates, quantised = make_round(8, 40, seed=9)  # t = 4; 7 shares of each survivor's seed
    server = SecAggServer(p)
    receive = server.receive_unmasking

    def corrupt(message):  # type: ignore[no-untyped-def]
        if message.sender == 2:
            flipped = tuple(dataclasses.replace(r, share=bytes(16)) for r in message.self_seed_shares)
            message = dataclasses.replace(message, self_seed_shares=flipped)
        receive(message)

    server.receive_unmasking = corrupt  # type: ignore[method-assign]
    result = local_round(p, quantised.__getitem__, clients=clients, server=server)
    check_sum(result.total, result.survivors, p, updates, quantised)


def test_reveals_the_request_did_not_ask_for_are_refused_whole() -> None:
    p, clients, _, quantised = make_round(6, 10, seed=10)
    server = SecAggServer(p)
    for c in p.clients:
        server.receive_keys(clients[c].advertise_keys())
    with pytest.raises(WrongStage):
        server.receive_masked_input(MaskedInput(1, quantised[1]))
    rosters = server.close_advertising()
    for c in p.clients:
        server.receive_shares(clients[c].share_keys(rosters[c]))
    deliveries = server.close_sharing()
    for c in (1, 2, 3, 4, 5):  # 6 drops before masking
        server.receive_masked_input(clients[c].mask(deliveries[c], quantised[c]))
    requests = server.close_masking()
    honest = clients[1].unmask(requests[1])
    assert {r.owner for r in honest.self_seed_shares} == {2, 3, 4, 5}
    assert {r.owner for r in honest.mask_seed_shares} == {6}
    # Both secrets of client 6: the mask-seed share it was asked for plus a self-seed share.
    both = dataclasses.replace(honest, self_seed_shares=(*honest.self_seed_shares, dataclasses.replace(
        honest.mask_seed_shares[0])))
    with pytest.raises(InconsistentReveal, match="both secrets"):
        server.receive_unmasking(both)
    asked_otherwise = dataclasses.replace(honest, mask_seed_shares=(dataclasses.replace(
        honest.self_seed_shares[0]),), self_seed_shares=honest.self_seed_shares[1:])
    with pytest.raises(InconsistentReveal, match="did not ask for"):
        server.receive_unmasking(asked_otherwise)
    server.receive_unmasking(honest)  # the honest answer is still taken
    with pytest.raises(MalformedMessage, match="already answered"):
        server.receive_unmasking(honest)


def test_unusable_keys_are_refused_at_advertisement_and_the_round_goes_on() -> None:
    p, clients, updates, quantised = make_round(6, 20, seed=13)
    server = SecAggServer(p)
    receive = server.receive_keys

    def hostile_or_not(message: KeyAdvertisement) -> None:
        if message.sender == 6:
            for bad in (bytes(32), b"short"):  # a low-order point (every agreement would be zero); 5 bytes
                with pytest.raises(MalformedMessage, match="client 6: unusable public key"):
                    receive(dataclasses.replace(message, mask_public_key=bad))
            with pytest.raises(MalformedMessage, match="commitment"):
                receive(dataclasses.replace(message, self_seed_commitment=b"x"))
            return
        receive(message)
        with pytest.raises(MalformedMessage, match="already advertised"):
            receive(message)

    server.receive_keys = hostile_or_not  # type: ignore[method-assign]
    result = local_round(p, quantised.__getitem__, clients=clients, server=server)
    assert result.survivors == frozenset(range(1, 6)) and not result.dropped  # 6 never entered U1
    check_sum(result.total, result.survivors, p, updates, quantised)


def test_the_client_refuses_requests_that_could_unmask_someone() -> None:
    p, clients, _, quantised = make_round(6, 10, seed=11)
    server = SecAggServer(p)
    for c in p.clients:
        server.receive_keys(clients[c].advertise_keys())
    rosters = server.close_advertising()
    for c in p.clients:
        server.receive_shares(clients[c].share_keys(rosters[c]))
    deliveries = server.close_sharing()
    for c in p.clients:
        server.receive_masked_input(clients[c].mask(deliveries[c], quantised[c]))
    everyone = frozenset(p.clients)
    with pytest.raises(InconsistentRequest, match="both surviving and dropped"):
        clients[1].unmask(UnmaskRequest(1, everyone, frozenset({2}), 6))
    with pytest.raises(InconsistentRequest):  # one request per round, even after a refused one
        clients[1].unmask(UnmaskRequest(1, everyone, frozenset(), 6))
    with pytest.raises(InconsistentRequest, match="leaves out a neighbour"):
        clients[2].unmask(UnmaskRequest(2, frozenset({1, 2, 3}), frozenset(), 6))
    with pytest.raises(InconsistentRequest, match="below the minimum"):
        clients[3].unmask(UnmaskRequest(3, frozenset({3}), everyone - {3}, 1))
    short = dataclasses.replace(rosters[4], recipient=4, keys=dict(list(rosters[4].keys.items())[:2]))
    fresh = SecAggClient(4, p)
    fresh.advertise_keys()
    with pytest.raises(TooFewNeighbours, match="2 neighbours advertised keys; the threshold is 3"):
        fresh.share_keys(short)


# -- what the coordinator holds --------------------------------------------------------------------

def arrays_in(obj: object, seen: set[int] | None = None) -> Iterator[np.ndarray]:
    """Every numpy array reachable from an object's attributes and containers."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from arrays_in(key, seen)
            yield from arrays_in(value, seen)
    elif isinstance(obj, list | tuple | set | frozenset):
        for item in obj:
            yield from arrays_in(item, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        yield from arrays_in(vars(obj), seen)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from arrays_in(getattr(obj, f.name), seen)


def test_the_coordinator_never_holds_an_unmasked_individual_update() -> None:
    p, clients, _, quantised = make_round(6, 64, seed=12)
    server = SecAggServer(p)
    inspected = []

    def inspect() -> None:
        held = list(arrays_in(server))
        inspected.append(len(held))
        for array in held:
            for q in quantised.values():
                assert not (array.shape == q.shape and np.array_equal(array, q))

    for name in ("receive_keys", "close_advertising", "receive_shares", "close_sharing",
                 "receive_masked_input", "close_masking", "receive_unmasking"):
        method = getattr(server, name)
        setattr(server, name, lambda *a, _m=method: (_m(*a), inspect())[0])
    result = local_round(p, quantised.__getitem__, clients=clients, server=server,
                         dropouts=DropoutPlan(before_masked_input=[6]))
    inspect()
    assert len(inspected) > 20 and all(inspected)  # it did hold arrays (the running sum) all along
    assert result.count == 5  # and what it hands over is a sum of five
    server._planted = {"deep": [quantised[4].copy()]}  # type: ignore[attr-defined]
    with pytest.raises(AssertionError):  # the inspection would have seen one anywhere in the object
        inspect()


def test_the_protocol_imports_no_tensorflow_grpc_or_database() -> None:
    code = ("import sys, fedrecon.core.secagg, fedrecon.core.secagg.local; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'tensorflow', 'keras', 'grpc', 'sqlalchemy', 'alembic', 'psycopg', 'google'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
