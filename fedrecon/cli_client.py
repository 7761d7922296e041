"""``fedrecon client``: users of a dataset taking part in a coordinator's rounds (registered in ``cli``).

It says what it connects to, fails in seconds with one line when it cannot (a coordinator that is down, TLS
against plaintext or the reverse, unreadable or mismatched certificate files), prints automatic retries as
they happen, and ends with what became of the reports: accepted, of those committed into a model version,
and refused. It exits 1 when nothing was accepted.

What ``--data`` is depends on the task: ratings (``synthetic`` or a MovieLens folder/file) for a task without
text, users' texts for a task whose model takes text (its description's ``text``: ``fedrecon.text_encoding``).
Text is encoded with the task's vocabulary, fetched from the coordinator with the model, never with one
built from the data at hand: a device's ids must mean what they meant in training.

Heavy imports (TensorFlow, gRPC) happen inside the command so ``fedrecon --help`` stays fast.
"""

from __future__ import annotations

import ssl
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

if TYPE_CHECKING:
    import grpc
    import numpy as np

    from fedrecon.core.batching import ClientExamples
    from fedrecon.protocol import ReportOutcome, RoundOutcome

console = Console(highlight=False, soft_wrap=True)  # one message, one line, whatever the width


def _fail(message: str, code: int = 1) -> NoReturn:
    """One line for people, then exit (the text is printed as is, never as markup)."""
    console.print(Text(f"fedrecon client: {message}", style="red"))
    raise typer.Exit(code)


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        _fail(f"cannot read {flag} {path}: {err.strerror or err}")


def tls_options(ca: Path | None, cert: Path | None, key: Path | None) -> grpc.ChannelCredentials | None:
    """Channel credentials from the command's TLS files, each checked so that a wrong file is one clear
    line here rather than a handshake that never completes."""
    from fedrecon.client import tls_credentials

    if (cert is None) != (key is None):
        _fail("--tls-cert and --tls-key go together (the client certificate for mutual TLS and its key)", 2)
    if ca is None:
        if cert is not None:
            _fail("--tls-cert/--tls-key need --tls-ca (the CA that signed the coordinator's certificate)", 2)
        return None
    ca_pem = _read(ca, "--tls-ca")
    try:
        ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    except (ssl.SSLError, ValueError) as err:
        _fail(f"--tls-ca {ca} is not a PEM CA certificate ({getattr(err, 'reason', None) or err})")
    if cert is None or key is None:
        return tls_credentials(ca_pem)
    cert_pem, key_pem = _read(cert, "--tls-cert"), _read(key, "--tls-key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as err:
        why = "the key does not belong to the certificate" if "MISMATCH" in str(err) else (
            "not a PEM certificate and an unencrypted PEM private key")
        _fail(f"--tls-cert {cert} / --tls-key {key}: {why} ({err.reason or err})")
    return tls_credentials(ca_pem, cert_chain=cert_pem, private_key=key_pem)


def _load_users(data: str, model_spec_json: str, task_item_ids: tuple[int, ...], *, split: str,
                split_seed: int, users: int) -> tuple[dict[int, ClientExamples], np.ndarray | None]:
    """The first ``users`` users of ``split`` as the model's examples, and the dataset's item ids when the
    clients speak them (a task with an item vocabulary). Text is encoded with the task's own vocabulary
    (its model description's ``text``), so only the chosen users' text is read into examples."""
    import json

    from fedrecon.simulations.text import load_texts, split_users
    from fedrecon.text_encoding import device_examples, encoding_of

    encoding = encoding_of(json.loads(model_spec_json))
    if encoding is not None:  # encoded as the client library encodes an app's texts
        texts = load_texts(data)
        parts = split_users(texts, seed=split_seed)
        return ({i: device_examples(texts[parts.kept[i]], encoding, model="the task's model")
                 for i in sorted(parts.ids(split))[:users]}, None)
    from fedrecon.simulations.ratings import load_dataset

    dataset = load_dataset(data, seed=split_seed)
    population = getattr(dataset, split)
    # With an item vocabulary the clients speak the dataset's own item ids; without, the model's indices.
    return ({u: population[u] for u in sorted(population)[:users]},
            dataset.item_ids if task_item_ids else None)


@dataclass(frozen=True)
class Summary:
    """What became of a run's reports, for the final line and the exit code."""

    accepted: int
    committed: int
    versions: tuple[int, ...]
    open_rounds: int  # accepted into rounds still open when the command ended
    failed_rounds: int  # accepted into rounds that then failed (not in the model)
    refused: Counter[str]
    other: Counter[str]  # capped, no assignment, unreachable, ...

    def line(self, clients: int) -> str:
        parts = []
        if self.versions:
            lo, hi = min(self.versions), max(self.versions)
            parts.append(f"committed {self.committed} into version{'s' if lo != hi else ''} "
                         f"{lo}{f'-{hi}' if lo != hi else ''}")
        else:
            parts.append(f"committed {self.committed}")
        if self.open_rounds:
            parts.append(f"{self.open_rounds} in rounds still open")
        if self.failed_rounds:
            parts.append(f"{self.failed_rounds} in rounds that failed")
        refused = sum(self.refused.values())
        why = f" ({', '.join(f'{k} {v}' for k, v in sorted(self.refused.items()))})" if refused else ""
        rest = "".join(f", {k} {v}" for k, v in sorted(self.other.items()))
        return (f"{clients} clients: accepted {self.accepted} ({'; '.join(parts)}), "
                f"refused {refused}{why}{rest}")


def summarize(outcomes: Iterable[ReportOutcome | str], rounds: Mapping[int, RoundOutcome]) -> Summary:
    """Reports (``ReportOutcome``) and other ends of a client round (strings), with the outcome of each
    round a report was accepted into, as one ``Summary``."""
    from fedrecon.protocol import RoundState

    accepted = committed = open_rounds = failed_rounds = 0
    versions: set[int] = set()
    refused: Counter[str] = Counter()
    other: Counter[str] = Counter()
    for outcome in outcomes:
        if isinstance(outcome, str):
            other[outcome] += 1
        elif not outcome.in_round:
            refused[outcome.status] += 1
        else:
            accepted += 1
            state = rounds.get(outcome.round_id)
            version = outcome.committed_version or (state.new_version if state is not None else None)
            if version is not None:
                committed += 1
                versions.add(version)
            elif state is not None and state.state == RoundState.FAILED:
                failed_rounds += 1
            else:
                open_rounds += 1
    return Summary(accepted, committed, tuple(sorted(versions)), open_rounds, failed_rounds, refused, other)


def client(
    task: Annotated[str, typer.Option(help="task name")],
    data: Annotated[str, typer.Option(help=(
        "one client per user of it. For a ratings task: 'synthetic' or a MovieLens folder/file. For a task "
        "whose model takes text (deploy/tasks/nextword.toml): a {user: [text, ...]} JSON file, a folder "
        "holding by_speaker.json, a folder of one .txt file (or one sub-folder of .txt files) per user, or "
        "'synthetic'; encoded with the task's vocabulary"))],
    coordinator: Annotated[str, typer.Option(
        help="host:port of the coordinator; replicas of one task as a comma-separated list (calls fail "
             "over to the next on UNAVAILABLE)")] = "127.0.0.1:50051",
    users: Annotated[int, typer.Option(min=1, help="how many users of the split take part")] = 20,
    split: Annotated[str, typer.Option(help="train, validation or test users")] = "train",
    rounds: Annotated[int, typer.Option(min=1, help="rounds each client takes part in")] = 1,
    threads: Annotated[int, typer.Option(min=0, help="clients running at once (0: all of them, as real "
                                                     "devices would; fewer may starve a round)")] = 0,
    evaluate: Annotated[bool, typer.Option(help="report reconstruct-then-evaluate metrics instead")] = False,
    max_wait: Annotated[float, typer.Option(help="seconds a client waits for an assignment")] = 600.0,
    split_seed: Annotated[int, typer.Option(help="seed of the user split (as in simulate)")] = 42,
    token: Annotated[str | None, typer.Option(envvar="FEDRECON_TOKEN", help="client token, if the "
                                              "coordinator requires one")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="PEM CA that signed the coordinator's certificate: "
                                                     "connect over TLS")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM client certificate, for a coordinator that "
                                                       "demands one (serve --tls-client-ca); with --tls-key")
                        ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert")] = None,
    connect_timeout: Annotated[float, typer.Option(min=0.1, help="seconds to wait for the first "
                                                                 "connection to the coordinator")] = 10.0,
) -> None:
    """Run USERS clients of a dataset against a coordinator, each as its own FederatedClient.

    Users are split into train, validation and test users by --split-seed as simulate splits them (text:
    users with under 100 words dropped first, as when the task's vocabulary was built), and the first
    USERS of --split take part. A text task's users encode their text with the task's vocabulary (served
    with the model), keep their first 256 sequences, reconstruct the task's local layers and upload only
    the global delta.

    With --token all users share one credential, which a coordinator counts as one device unless the token
    was issued for more (fedrecon token issue --max-devices N): its other users are then refused
    assignments or check-ins ("capped"), and the command says so. Exits 1 when no report was accepted."""
    if split not in ("train", "validation", "test"):
        _fail("--split must be train, validation or test", 2)
    credentials = tls_options(tls_ca, tls_cert, tls_key)

    import grpc

    from fedrecon.client import (
        CoordinatorChannel,
        CoordinatorUnreachable,
        FederatedClient,
        NoAssignment,
        RetryEvent,
        RetryPolicy,
    )
    from fedrecon.core.batching import ClientExamples
    from fedrecon.protocol import CREDENTIAL_SHARE_HINT, ReportOutcome

    def retry_line(who: str, event: RetryEvent) -> Text:
        return Text(f"{who}: {event.call} {event.code}, retry {event.attempt} in {event.delay_s:.1f} s"
                    f"{' (as the coordinator asked)' if event.hinted else ''}")

    policy = RetryPolicy(connect_timeout_s=connect_timeout)
    console.print(f"connecting to {coordinator} ({'TLS' if credentials else 'plaintext'})")
    channel = CoordinatorChannel(coordinator, retry=policy, token=token, tls=credentials,
                                 on_retry=lambda event: console.print(retry_line("coordinator", event)))
    try:
        channel.connect()
        latest = channel.latest_model(task)  # the task exists, and we may call it
    except CoordinatorUnreachable as err:
        _fail(str(err))
    except grpc.RpcError as err:
        _fail(f"the coordinator at {coordinator} refused: {err.code().name}: {err.details()}")  # type: ignore[attr-defined]
    try:
        population, item_ids = _load_users(data, latest.model_spec_json, latest.item_ids, split=split,
                                           split_seed=split_seed, users=users)
    except (OSError, ValueError) as err:
        _fail(f"cannot load --data {data}: {err}")
    chosen = sorted(population)
    if not chosen:
        _fail(f"the {split} split of {data} has no users")
    total = len(chosen) * (1 if evaluate else rounds)

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console) as progress:

        def on_retry(user: int) -> Callable[[RetryEvent], None]:
            return lambda event: progress.console.print(retry_line(f"user-{user}", event))

        def examples_of(user: int) -> ClientExamples:
            e = population[user]
            return e if item_ids is None else ClientExamples(x=item_ids[e.x], y=e.y)

        def run_one(user: int) -> list[ReportOutcome | str]:
            with FederatedClient(coordinator, task, f"user-{user}", examples_of(user), token=token,
                                 tls=credentials, retry=policy, on_retry=on_retry(user)) as c:
                if evaluate:
                    try:
                        c.evaluate()
                        return ["evaluated"]
                    except grpc.RpcError as err:
                        return [f"evaluation refused ({err.code().name})"]  # type: ignore[attr-defined]
                results: list[ReportOutcome | str] = []
                for _ in range(rounds):
                    try:
                        results.append(c.participate(max_wait_s=max_wait))
                    except NoAssignment as err:
                        results.append("capped" if CREDENTIAL_SHARE_HINT in str(err) else "no assignment")
                        break
                    except grpc.RpcError as err:
                        if CREDENTIAL_SHARE_HINT in (err.details() or ""):  # type: ignore[attr-defined]
                            results.append("capped")  # the token's share is spent: asking again cannot help
                            break
                        code = err.code()  # type: ignore[attr-defined]
                        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                            results.append(f"unreachable ({code.name})")
                            break
                        results.append(ReportOutcome(False, err.details() or "", code.name))  # type: ignore[attr-defined]
                    except Exception as err:  # a local failure of one client: count it, go on
                        results.append(f"failed ({type(err).__name__}: {err})")
                        break
                return results

        bar = progress.add_task("client rounds", total=total, info="")
        outcomes: list[ReportOutcome | str] = []
        shown: Counter[str] = Counter()
        with ThreadPoolExecutor(max_workers=threads or len(chosen)) as pool:
            for future in as_completed([pool.submit(run_one, u) for u in chosen]):
                for outcome in future.result():
                    outcomes.append(outcome)
                    shown[outcome if isinstance(outcome, str) else
                          "accepted" if outcome.in_round else f"refused ({outcome.status})"] += 1
                    progress.update(bar, advance=1, info=", ".join(f"{k} {v}" for k, v in shown.items()))

    if evaluate:
        done = sum(1 for o in outcomes if o == "evaluated")
        console.print(f"{len(chosen)} clients: " + ", ".join(f"{k} {v}" for k, v in sorted(shown.items())))
        if not done:
            raise typer.Exit(1)
        return
    round_ids = {o.round_id for o in outcomes if not isinstance(o, str) and o.in_round}
    states: dict[int, RoundOutcome] = {}
    for round_id in sorted(round_ids):
        try:
            states[round_id] = channel.round_outcome(task, round_id)
        except grpc.RpcError:  # the coordinator went away at the end: those reports stay "still open"
            break
    channel.close()
    summary = summarize(outcomes, states)
    console.print(summary.line(len(chosen)))
    capped = summary.other["capped"]
    if capped and token:
        console.print(f"{capped} of {len(chosen)} users were capped: one token is one device unless issued "
                      f"for more; run {len(chosen)} users with 'fedrecon token issue --max-devices "
                      f"{len(chosen)}'.")
    elif capped:
        console.print(f"{capped} of {len(chosen)} users were capped: one client certificate is one device; "
                      "run one user per certificate.")
    if not summary.accepted:
        raise typer.Exit(1)
