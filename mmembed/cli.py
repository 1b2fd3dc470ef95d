"""The `mmembed` command line."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mmembed.config import get_settings

if TYPE_CHECKING:
    from mmembed.jobs.ingest import IngestOptions
    from mmembed.jobs.watch import WatchOptions
    from mmembed.serve.launch import Running

app = typer.Typer(help="Multi-modal embedding server and pipeline.", no_args_is_help=True)
models_app = typer.Typer(help="Provision and check model weights.", no_args_is_help=True)
demo_app = typer.Typer(help="The rendered demo world and its small CLIP.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(demo_app, name="demo")
dlq_app = typer.Typer(help="Items that failed past their retries, per job.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
cache_app = typer.Typer(help="The embedding cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
cluster_app = typer.Typer(
    help="A Ray cluster of a head and worker nodes on this machine (Linux).", no_args_is_help=True
)
app.add_typer(cluster_app, name="cluster")
console = Console()

# Models that provision with no network: what the quick start and CI rely on.
OFFLINE_MODELS = ("demo-clip", "all-MiniLM-L6-v2", "whisper-base", "bind")


def _fail(exc: Exception) -> NoReturn:
    console.print("[red]error:[/red]", escape(str(exc)))  # its text may hold brackets: paths, lists
    raise typer.Exit(1)


@models_app.command("list")
def models_list() -> None:
    """Every catalogue model: family, where its weights come from, and whether it is here."""
    from mmembed.encoders import CATALOGUE, is_provisioned

    settings = get_settings()
    table = Table("name", "family", "source", "dim", "modalities", "provisioned", "licence")
    for spec in CATALOGUE.values():
        table.add_row(
            spec.name,
            spec.family,
            spec.source + (" (offline)" if spec.offline else ""),
            str(spec.dim or "-"),
            ",".join(spec.modalities),
            "yes" if is_provisioned(spec, settings.models_config()) else "no",
            spec.licence,
        )
    for name, remote in settings.all_remote_models().items():
        table.add_row(name, f"remote ({remote.kind})", remote.base_url, str(remote.dim), "text", "n/a (remote)", "")
    console.print(table)
    console.print(f"models directory: {settings.models_path}")
    console.print(
        "Also: any open_clip ARCH@TAG, local-dir:/path, hf-clip:/path, sentence-transformers/NAME, whisper-SIZE, "
        "and remote APIs openai:MODEL / cohere:MODEL (text; key in OPENAI_API_KEY / COHERE_API_KEY)"
    )


@models_app.command("pull")
def models_pull(
    names: Annotated[list[str] | None, typer.Argument(help="Model names; none: every offline model.")] = None,
    force: Annotated[bool, typer.Option(help="Fetch again even if present.")] = False,
    from_path: Annotated[
        Path | None, typer.Option("--from", help="Adopt a checkpoint file or snapshot folder already on disk.")
    ] = None,
) -> None:
    """Put weights into the models directory (hub models need internet, or --from a copy)."""
    from mmembed.encoders import EncoderError, pull

    if from_path and (not names or len(names) != 1):
        _fail(ValueError("--from needs exactly one model name"))
    from mmembed.encoders import resolve

    for name in names or OFFLINE_MODELS:
        try:
            spec = resolve(name, get_settings().models_config())
            if spec.source == "remote":  # the provider holds the weights: nothing to download, ever
                console.print(f"[green]remote[/green] {name}: nothing to pull, it calls {spec.ref.split()[1]}")
                continue
            path = pull(name, get_settings().models_config(), force=force, from_path=from_path)
        except EncoderError as exc:
            _fail(exc)
        console.print(f"[green]pulled[/green] {name} -> {path}")


@models_app.command("verify")
def models_verify(
    names: Annotated[list[str] | None, typer.Argument(help="Model names; none: every offline model.")] = None,
) -> None:
    """Check files against their recorded hashes, dimensions, and a real forward pass."""
    from mmembed.encoders import EncoderError, verify

    for name in names or OFFLINE_MODELS:
        try:
            report = verify(name, get_settings().models_config())
        except EncoderError as exc:
            _fail(exc)
        console.print(f"[green]ok[/green] {name}: {json.dumps({k: v for k, v in report.items() if k != 'ok'})}")


@demo_app.command("render")
def demo_render(
    out: Annotated[Path, typer.Argument(help="Folder to write scenes into.")],
    count: Annotated[int, typer.Option(help="Number of scenes.")] = 60,
    seed: Annotated[int, typer.Option()] = 7,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 256,
) -> None:
    """Render demo scenes as JPEGs with a captions.jsonl (ground truth)."""
    from mmembed.demo.files import write_scenes

    n = write_scenes(out, count, seed, size)
    console.print(f"rendered {n} scenes into {out} (captions in {out / 'captions.jsonl'})")


@demo_app.command("train-clip")
def demo_train_clip(
    out: Annotated[Path, typer.Option(help="Where to write the open_clip folder.")] = Path(
        "encoders/weights/demo-clip"
    ),
    steps: Annotated[int, typer.Option(help="Optimiser steps (about 1 s each on 2 CPU cores).")] = 3600,
    batch_size: Annotated[int, typer.Option()] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule after a warm-up).")] = 1e-3,
    resume: Annotated[
        Path | None, typer.Option("--from", help="Fine-tune these weights (open_clip_model.safetensors).")
    ] = None,
    position_queries: Annotated[
        bool, typer.Option(help="Weigh short training queries towards positions (the fine-tune's mix).")
    ] = False,
    full_fraction: Annotated[float, typer.Option(help="Share of full captions among training queries.")] = 0.5,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option()] = 2,
) -> None:
    """Train demo-clip on freshly rendered scenes (from scratch, or fine-tune with --from), then
    write its held-out report. docs/models.md gives the shipped checkpoint's recipe."""
    from mmembed.demo import world
    from mmembed.demo.report import write_report
    from mmembed.demo.train_clip import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    forms = world.POSITION_FORMS if position_queries else world.QUERY_FORMS
    train(
        out,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        threads=threads,
        resume=resume,
        forms=forms,
        full_fraction=full_fraction,
    )
    report = write_report(out, get_settings().models_config())
    console.print(json.dumps(report, indent=2))


@demo_app.command("report")
def demo_report(
    weights: Annotated[Path, typer.Option(help="An open_clip folder.")] = Path("encoders/weights/demo-clip"),
    n: Annotated[int, typer.Option(help="Held-out scene/caption pairs.")] = 1000,
) -> None:
    """Evaluate a demo-clip checkpoint on held-out scenes and write docs/demo-clip-report.md."""
    from mmembed.demo.report import write_report

    console.print(json.dumps(write_report(weights, get_settings().models_config(), n=n), indent=2))


@demo_app.command("train-bind")
def demo_train_bind(
    out: Annotated[Path, typer.Option(help="Where to write the head.")] = Path("encoders/weights/bind"),
    clips: Annotated[int, typer.Option(help="Spoken training captions (about 0.3 s each to make).")] = 5000,
    steps: Annotated[int, typer.Option(help="Optimiser steps for the head.")] = 3000,
    batch_size: Annotated[int, typer.Option()] = 128,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option()] = 2,
) -> None:
    """Train the bind head on espeak-ng speech of demo captions, then write its held-out report."""
    from mmembed.demo.bind_report import write_report
    from mmembed.demo.train_bind import BindData, train_bind

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = get_settings()
    data = BindData(clips=clips, seed=seed)
    train_bind(out, data, steps=steps, batch_size=batch_size, threads=threads, settings=settings)
    console.print(json.dumps(write_report(settings, f"bind-dir:{out.resolve()}"), indent=2))


@demo_app.command("bind-report")
def demo_bind_report(
    model: Annotated[str, typer.Option(help="'bind', or 'bind-dir:/path' for a freshly trained head.")] = "bind",
) -> None:
    """Evaluate a bind head on held-out voices and captions; writes docs/bind-report.md."""
    from mmembed.demo.bind_report import write_report

    console.print(json.dumps(write_report(get_settings(), model), indent=2))


@app.command("transcribe")
def transcribe(
    files: Annotated[list[Path], typer.Argument(help="Audio files (wav, flac, mp3, ogg, m4a, webm).")],
    model: Annotated[str, typer.Option(help="A Whisper model: whisper-base, or whisper-SIZE[+TEXTMODEL].")] = (
        "whisper-base"
    ),
) -> None:
    """Transcribe audio files with Whisper; prints transcript, language and timed segments."""
    from mmembed.encoders import EncoderError, Modality, load

    try:
        speech = load(model, get_settings()).encoder(Modality.AUDIO)
    except EncoderError as exc:
        _fail(exc)
    for path, result in zip(files, speech.encode_items(files), strict=True):
        if result.error is not None:
            console.print(f"[yellow]{path}[/yellow]: {result.error.code}: {result.error}")
            continue
        console.print(f"[green]{path}[/green] ({result.info['language']}, {result.info['seconds']:.1f} s)")
        for seg in result.info["segments"]:
            console.print(f"  [{seg['start']:6.2f} -> {seg['end']:6.2f}] {seg['text']}")


@app.command("serve")
def serve_command(
    config: Annotated[Path | None, typer.Option(help="Serve config YAML (the file `serve run` takes).")] = None,
    address: Annotated[str | None, typer.Option(help="Join this Ray cluster instead of starting one.")] = None,
    host: Annotated[str | None, typer.Option(help="Override http_options.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Override http_options.port.")] = None,
    dashboard_host: Annotated[
        str, typer.Option(help="Interface the Ray dashboard listens on (0.0.0.0 in a container).")
    ] = "127.0.0.1",
    metrics_export_port: Annotated[
        int | None,
        typer.Option(help="Fixed port for Ray's Prometheus metrics (Serve's series), for a scraper to find."),
    ] = None,
) -> None:
    """Start Ray (or join --address), deploy the encoders behind the HTTP API, and serve until Ctrl-C."""
    from mmembed.serve import launch

    running = _start_server(
        config, address, host, port, dashboard_host=dashboard_host, metrics_export_port=metrics_export_port
    )
    console.print("serving; Ctrl-C to stop")
    launch.wait_for_signal()
    console.print("shutting down")
    _stop_server(running)


def _start_server(
    config: Path | None,
    address: str | None,
    host: str | None,
    port: int | None,
    quiet: bool = False,
    dashboard_host: str = "127.0.0.1",
    metrics_export_port: int | None = None,
) -> Running:
    from mmembed.serve import launch, local

    try:
        ingress = get_settings().serve_ingress
        running = launch.start(config, address, host, port, quiet, dashboard_host, metrics_export_port, ingress)
    except Exception as exc:  # a model that fails to load, a port in use: say which and stop
        _fail(exc)
    local.note(get_settings().data_dir.expanduser(), running.url.replace("0.0.0.0", "127.0.0.1"))
    for name, served in running.urls.items():
        url = served.replace("0.0.0.0", "127.0.0.1")  # bound to every interface, opened on this one
        which = f" ({name})" if len(running.urls) > 1 else ""
        console.print(f"mmembed API{which}: {url}  (OpenAPI docs: {url}/docs, OpenAI base_url: {url}/v1)")
    token = "sign-in token: `ray get-auth-token`, or ~/.ray/auth_token"
    console.print(f"Ray dashboard: {running.dashboard_url}  ({token})")
    return running


def _stop_server(running: Running) -> None:
    from mmembed.serve import launch, local

    local.forget(get_settings().data_dir.expanduser())
    launch.stop(running)


@app.command("search")
def search_command(
    text: Annotated[str | None, typer.Argument(help="Text query, e.g. 'red circle'.")] = None,
    image: Annotated[Path | None, typer.Option(help="Image file: find similar images.")] = None,
    audio: Annotated[Path | None, typer.Option(help="Audio file: search by voice.")] = None,
    item: Annotated[str | None, typer.Option(help="An item id: more like this.")] = None,
    vector: Annotated[
        list[str] | None,
        typer.Option(help="Named vector to search (default: the image vector); given twice or more, fused."),
    ] = None,
    fuse: Annotated[bool, typer.Option(help="Fuse every vector the query can search into one ranking.")] = False,
    via: Annotated[str | None, typer.Option(help="Model that encodes the query.")] = None,
    transcript: Annotated[bool, typer.Option(help="Audio: search through the transcript.")] = False,
    top_k: Annotated[int, typer.Option(help="How many hits.")] = 10,
    threshold: Annotated[float | None, typer.Option(help="Drop hits scoring below this.")] = None,
    filter: Annotated[str | None, typer.Option(help='Payload filter as JSON: \'{"kind": "image"}\'.')] = None,
    url: Annotated[str, typer.Option(help="The mmembed server.")] = "http://127.0.0.1:8000",
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw response.")] = False,
) -> None:
    """Search the catalogue of a running server (`mmembed serve`) by text, image, voice or item."""
    import base64

    import httpx

    body: dict[str, object] = {"top_k": top_k, "route": "transcript" if transcript else "direct"}
    if text is not None:
        body["text"] = text
    for key, path in (("image", image), ("audio", audio)):
        if path is not None:
            body[key] = base64.b64encode(path.read_bytes()).decode()
    if item is not None:
        body["item_id"] = item
    body |= {k: v for k, v in (("via", via), ("threshold", threshold)) if v is not None}
    if vector and len(vector) > 1:
        body["vectors"] = vector
    elif vector:
        body["vector"] = vector[0]
    body["fuse"] = fuse
    try:
        if filter:
            body["filter"] = json.loads(filter)
        response = httpx.post(f"{url}/search", json=body, timeout=120)
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        _fail(exc)
    if response.status_code != 200:
        _fail(RuntimeError(response.json().get("error", {}).get("message", response.text)))
    found = response.json()
    if as_json:
        console.print_json(data=found)
        return
    heard = f", heard {found['query']['transcript']!r}" if "transcript" in found["query"] else ""
    fused = "vectors" in found
    searched = f"{found['fusion']} over {', '.join(found['vectors'])}" if fused else found["vector"]
    via_models = ", ".join(sorted(set(found["models"].values()))) if fused else found["model"]
    table = Table(title=f"{searched} via {via_models}{heard} ({found['took_ms']} ms)")
    for column in ("score", "id", "kind", "caption / transcript", "url", *(["ranks"] if fused else [])):
        table.add_column(column)
    for hit in found["hits"]:
        payload = hit["payload"]
        words = payload.get("caption") or payload.get("transcript") or ""
        ranks = [", ".join(f"{v} #{r}" for v, r in hit["matched"].items())] if fused else []
        table.add_row(f"{hit['score']:.3f}", hit["id"], payload.get("kind", ""), words, hit["url"], *ranks)
    console.print(table)


@app.command("eval")
def eval_command(
    items: Annotated[
        Path | None, typer.Option(help="Manifest of items (CSV or JSONL: id, uri, kind, caption).")
    ] = None,
    queries: Annotated[Path | None, typer.Option(help="Queries (JSONL: id, text|image|audio, relevant ids).")] = None,
    model: Annotated[list[str] | None, typer.Option(help="A candidate model; repeat for each.")] = None,
    fuse: Annotated[
        list[str] | None,
        typer.Option(help="A fused candidate, models joined by '+' (demo-clip+all-MiniLM-L6-v2); repeat for each."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Report folder (report.md, report.json, plots).")] = Path("eval-report"),
    url: Annotated[str | None, typer.Option(help="Measure a running server instead of this process.")] = None,
    demo: Annotated[bool, typer.Option(help="Evaluate the demo world (the shipped example).")] = False,
    corpus_size: Annotated[int, typer.Option(help="Your full corpus size, for cost and time (0: the set's).")] = 0,
    price_per_hour: Annotated[float, typer.Option(help="USD per hour of the machine that embeds.")] = 1.0,
    traffic_qps: Annotated[float, typer.Option(help="Query traffic to size for.")] = 10.0,
    batch_size: Annotated[int, typer.Option(help="Items per encode call.")] = 32,
) -> None:
    """Compare models on your own data: Recall@1/5/10, MRR, nDCG@10, speed, cost and index size,
    with plots and a recommendation."""
    from mmembed.evaluation.dataset import DatasetError, load_eval_set
    from mmembed.evaluation.demo import DEMO_FUSED, DEMO_MODELS, build_demo_set
    from mmembed.evaluation.embedders import HttpEmbedder, LocalEmbedder
    from mmembed.evaluation.report import write_report
    from mmembed.evaluation.run import Costs, Scores, evaluate_fused, evaluate_model
    from mmembed.loaders.fetch import FetchLimits

    if demo:
        items, queries = build_demo_set(out / "data")
        model = model or list(DEMO_MODELS)
        fuse = fuse if fuse is not None else list(DEMO_FUSED)
        corpus_size = corpus_size or 1_000_000  # projections at a catalogue's scale, not the set's
    if items is None or queries is None or not model:
        _fail(ValueError("give --items, --queries and at least one --model (or --demo)"))
    try:
        settings = get_settings()
        limits = FetchLimits(max_bytes=settings.max_image_bytes, policy=settings.url_policy())
        evalset = load_eval_set(items, queries, limits)
    except (DatasetError, OSError) as exc:
        _fail(exc)
    costs = Costs(corpus_size, price_per_hour, traffic_qps)
    fused = [spec.split("+") for spec in fuse or []]
    results, scored = [], {}
    for name in dict.fromkeys([*model, *(m for parts in fused for m in parts)]):  # a fused one's parts too
        console.print(f"evaluating {name} on {len(evalset.items)} items and {len(evalset.queries)} queries")
        try:
            embedder = HttpEmbedder(url, name) if url else LocalEmbedder(name, get_settings())
            scores: Scores = {}
            results.append(evaluate_model(evalset, embedder, batch_size, costs=costs, scores=scores))
            scored[name] = (results[-1], scores)
        except Exception as exc:  # one candidate that cannot load must not lose the others' results
            console.print(f"[red]{name} failed:[/red] {exc}")
    for parts in fused:
        if all(m in scored for m in parts):
            results.append(evaluate_fused(evalset, [scored[m] for m in parts], costs))
    if not results:
        _fail(RuntimeError("no model could be evaluated"))
    setup = {
        "items": str(items),
        "queries": str(queries),
        "item count": len(evalset.items),
        "query count": len(evalset.queries),
        "measured": url or "in process",
        "batch size": batch_size,
        "corpus size for projections": corpus_size or len(evalset.items),
        "price per hour (USD)": price_per_hour,
        "traffic (queries/s)": traffic_qps,
    }
    report = write_report(results, out, setup)
    console.print(f"[bold]recommendation: {report['recommendation']['model']}[/bold] ({out / 'report.md'})")
    for line in report["recommendation"]["against"]:
        console.print(f"  {line}")


@app.command("ingest")
def ingest_command(
    source: Annotated[
        str, typer.Argument(help="A folder, a manifest (.csv/.jsonl/.parquet), s3://bucket/prefix or a .txt of URLs.")
    ],
    dry_run: Annotated[bool, typer.Option(help="Print the plan and the estimate, write nothing.")] = False,
    sync: Annotated[bool, typer.Option(help="Also delete the points of items gone from the source.")] = False,
    model: Annotated[list[str] | None, typer.Option(help="Models to embed with (default: the offline set).")] = None,
    batch_size: Annotated[int, typer.Option(help="Items per forward pass.")] = 32,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes for read/decode.")] = 2,
    price_per_hour: Annotated[float, typer.Option(help="USD per hour of this machine, for the estimate.")] = 1.0,
    checkpoint_every: Annotated[int, typer.Option(help="Batches between saved progress.")] = 4,
    checkpoint_seconds: Annotated[
        float, typer.Option(help="And at least this many seconds: each save flushes the vector store.")
    ] = 5.0,
    engine: Annotated[
        str, typer.Option(help="local (DataLoader workers) or ray (Ray Data; RAY_ADDRESS names a cluster).")
    ] = "local",
    ray_encoders: Annotated[int, typer.Option(help="Ray engine: encoder actors.")] = 1,
    num_gpus_per_encoder: Annotated[float, typer.Option(help="Ray engine: GPUs per encoder actor.")] = 0.0,
    encoder_resources: Annotated[
        str | None,
        typer.Option(help="Ray engine: custom resources per encoder actor, as JSON (e.g. '{\"encoder\": 0.5}')."),
    ] = None,
    server: Annotated[
        str | None, typer.Option(help="Run the job on this mmembed server (its models, its store) instead.")
    ] = None,
    watch: Annotated[
        bool, typer.Option(help="Then keep following the source (a folder's events, an S3 prefix's listings).")
    ] = False,
    watch_delay: Annotated[float, typer.Option(help="Watch: seconds without a change that end a burst.")] = 1.0,
    watch_settle: Annotated[float, typer.Option(help="Watch: seconds a file must hold still before it is read.")] = 1.0,
    watch_poll: Annotated[float, typer.Option(help="Watch: seconds between listings of an S3 prefix.")] = 30.0,
) -> None:
    """Embed a catalogue into the collection: plan, estimate, then an incremental, resumable run.
    When a local server holds the collection, the job goes to that server."""
    from mmembed.jobs.ingest import DEFAULT_MODELS, Ingest, IngestOptions
    from mmembed.jobs.watch import WatchOptions
    from mmembed.serve import local
    from mmembed.store.vectors import StoreBusy

    target = server or (None if dry_run else local.serving(get_settings().data_dir.expanduser()))
    if watch and target is not None:
        _fail(ValueError(f"--watch runs in this process, and a server ({target}) holds the collection: stop it first"))
    if target is not None:
        if server is None:
            console.print(f"a server on this data directory holds the collection: the job runs on {target}")
        _ingest_on_server(target, source, model, sync)
        return

    options = IngestOptions(
        source,
        tuple(model or DEFAULT_MODELS),
        batch_size,
        workers,
        sync=sync,
        price_per_hour=price_per_hour,
        checkpoint_every=checkpoint_every,
        checkpoint_seconds=checkpoint_seconds,
        engine=engine,
        ray_encoders=ray_encoders,
        num_gpus_per_encoder=num_gpus_per_encoder,
        encoder_resources=_json_resources(encoder_resources),
    )
    if watch:
        _watch(options, WatchOptions(watch_delay, watch_settle, watch_poll))
        return
    try:
        job = Ingest(options, get_settings())
        plan = job.plan()
        for line in plan.lines():
            console.print(line)
        if dry_run:
            return
        summary = job.run(plan)
    except StoreBusy as exc:
        _fail(f"{exc}; if a server holds it, send it the job: mmembed ingest {source} --server URL")
    except Exception as exc:  # a bad source, an unreachable store: say which and stop
        _fail(exc)
    for line in summary.lines():
        console.print(line)


def _json_resources(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    try:
        resources = json.loads(text)
        if not isinstance(resources, dict):
            raise ValueError("not an object")
        return {str(k): float(v) for k, v in resources.items()}
    except (ValueError, TypeError) as exc:
        _fail(ValueError(f'--encoder-resources must be a JSON object of numbers, like {{"encoder": 0.5}}: {exc}'))


def _watch(options: IngestOptions, watch: WatchOptions) -> None:
    """Rounds until Ctrl-C: the first a whole pass with --sync, then one per burst of changes."""
    from mmembed.jobs.watch import Watch

    console.print(f"watching {options.source}; Ctrl-C to stop")
    try:
        for done in Watch(options, get_settings(), watch).rounds():
            kind = "whole pass" if done.whole else "changes"
            console.print(f"[{time.strftime('%H:%M:%S')}] {kind}: {done.summary.lines()[0]}")
            if done.waiting:
                console.print(f"  still being written, read later: {', '.join(done.waiting)}")
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # a bad source, an unreachable store: say which and stop
        _fail(exc)
    console.print("stopped watching")


def _ingest_on_server(url: str, source: str, models: list[str] | None, sync: bool) -> None:
    """The server reads the source itself: a local path goes as an absolute one."""
    if "://" not in source:
        source = str(Path(source).expanduser().resolve())
    try:
        counts = _server_job(url, source, f"ingesting {source} on {url}", models, sync)
    except Exception as exc:
        _fail(exc)
    plan = counts["plan"]
    console.print(
        f"{plan['total']} items: {counts['written']} embedded, {plan['unchanged']} unchanged, "
        f"{counts['failed']} failed, {counts['deleted']} deleted"
    )


@app.command("migrate")
def migrate_command(
    to: Annotated[str | None, typer.Option("--to", help="The model whose vectors the collection moves to.")] = None,
    from_: Annotated[
        str | None, typer.Option("--from", help="The model it moves from (default: the one searches use now).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the plan and the estimate, write nothing.")] = False,
    rollback: Annotated[bool, typer.Option(help="Switch the default vectors back to the old model's.")] = False,
    drop_old: Annotated[bool, typer.Option(help="Free the old model's vectors (no rollback after).")] = False,
    accept_failed: Annotated[
        bool, typer.Option(help="Switch even if some items could not be encoded (they keep their old vectors).")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Items per forward pass.")] = 32,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes for read/decode.")] = 2,
    price_per_hour: Annotated[float, typer.Option(help="USD per hour of this machine, for the estimate.")] = 1.0,
    checkpoint_every: Annotated[int, typer.Option(help="Batches between saved progress.")] = 4,
    checkpoint_seconds: Annotated[
        float, typer.Option(help="And at least this many seconds: each save flushes the vector store.")
    ] = 5.0,
    server: Annotated[
        str | None, typer.Option(help="Run it on this mmembed server (its models, its store) instead.")
    ] = None,
) -> None:
    """Move the collection to another model with no downtime: the new model's vectors are computed from
    the stored objects in a resumable job while searches answer from the old ones, then the default
    vectors switch in one write. --rollback switches back; --drop-old frees the old vectors."""
    from mmembed.jobs.migrate import MigrateOptions, Migration
    from mmembed.serve import local
    from mmembed.store.switching import drop_old as drop
    from mmembed.store.switching import rollback as switch_back
    from mmembed.store.vectors import StoreBusy, open_store

    if sum([to is not None, rollback, drop_old]) != 1:
        _fail(ValueError("give exactly one of --to MODEL, --rollback or --drop-old"))
    if dry_run and to is None:
        _fail(ValueError("--dry-run plans a migration: give it with --to MODEL"))
    settings = get_settings()
    target = server or (None if dry_run else local.serving(settings.data_dir.expanduser()))
    if target is not None:
        _migrate_on_server(target, to, from_, rollback, drop_old, accept_failed)
        return
    try:
        if to is None:
            store = open_store(settings.vectors_config())
            store.open_existing()
            if rollback:
                lines = switch_back(store).lines()
            else:
                lines = [f"dropped {', '.join(drop(store))}; rollback is no longer possible"]
            store.close()
        else:
            options = MigrateOptions(
                to,
                from_,
                batch_size,
                workers,
                accept_failed=accept_failed,
                price_per_hour=price_per_hour,
                checkpoint_every=checkpoint_every,
                checkpoint_seconds=checkpoint_seconds,
            )
            job = Migration(options, settings)
            plan = job.plan()
            for line in [f"migrating {settings.collection} from {job.old} to {to}", *plan.lines()]:
                console.print(line)
            if dry_run:
                return
            summary = job.run(plan)
            assert job.switched is not None
            lines = [*summary.lines(), *job.switched.lines()]
    except StoreBusy as exc:
        _fail(f"{exc}; if a server holds it, run the migration there: mmembed migrate --to {to} --server URL")
    except Exception as exc:  # a model not served, a collection not made yet: say which and stop
        _fail(exc)
    for line in lines:
        console.print(line)


def _migrate_on_server(
    url: str, to: str | None, from_: str | None, rollback: bool, drop_old: bool, accept_failed: bool
) -> None:
    import httpx

    try:
        if to is not None:
            body = {"to": to, "from": from_, "accept_failed": accept_failed}
            counts = _server_job(url, "", f"migrating to {to} on {url}", path="/migrations", body=body)
            console.print(f"{counts['written']} items migrated, {counts['failed']} failed; {counts.get('switch')}")
            return
        action = "rollback" if rollback else "drop-old"
        answer = httpx.post(f"{url}/migrations/{action}", timeout=600)
        if answer.status_code != 200:
            raise RuntimeError(f"the server at {url} refused ({answer.status_code}): {answer.text}")
        console.print(answer.json())
    except Exception as exc:
        _fail(exc)


def _jobs():  # type: ignore[no-untyped-def]
    from mmembed.jobs.state import JobStore

    return JobStore(get_settings().data_dir.expanduser() / "jobs.sqlite")


@dlq_app.command("list")
def dlq_list(job: Annotated[str | None, typer.Option(help="Only this job.")] = None) -> None:
    table = Table("job", "uri", "code", "reason", "attempts")
    for d in _jobs().dead_letters(job):
        table.add_row(d.job_id, d.uri, d.code, d.reason, str(d.attempts))
    console.print(table)


@dlq_app.command("retry")
def dlq_retry(job: Annotated[str, typer.Argument(help="The job whose dead letters to try again.")]) -> None:
    """Put the job's dead letters back in its plan and run it again."""
    from mmembed.jobs.ingest import Ingest, IngestOptions

    store = _jobs()
    row = store.get(job)
    if row is None:
        _fail(KeyError(f"no job {job!r}"))
    count = store.requeue_dead_letters(job)
    store.update(job, status="interrupted")
    console.print(f"{count} item(s) back in job {job}")
    options = IngestOptions(row.source, tuple(row.config["models"]))
    summary = Ingest(options, get_settings(), jobs=store).run()
    for line in summary.lines():
        console.print(line)


@dlq_app.command("purge")
def dlq_purge(job: Annotated[str | None, typer.Option(help="Only this job.")] = None) -> None:
    console.print(f"purged {_jobs().purge_dead_letters(job)} dead letter(s)")


@cache_app.command("warm")
def cache_warm(
    model: Annotated[
        list[str] | None, typer.Option(help="Only these models (default: every model in the collection).")
    ] = None,
) -> None:
    """Fill the embedding cache from the vectors the collection holds, so content it has is never encoded
    again (by a job into a new collection, another machine sharing the cache, or the API)."""
    from mmembed.encoders import UnknownModel, model_version, resolve
    from mmembed.store.cache import open_cache
    from mmembed.store.vectors import StoreBusy, StoreError, open_store
    from mmembed.store.warm import warm_cache

    settings = get_settings()
    cache = open_cache(settings.cache_config())
    if cache is None:
        _fail(ValueError("the embedding cache is off (MMEMBED_CACHE_URL=off): there is nothing to warm"))
    store = open_store(settings.vectors_config())
    try:
        layout = store.open_existing()
    except (StoreBusy, StoreError) as exc:
        _fail(exc)
    in_collection = list(dict.fromkeys(name.rpartition(".")[0] for name in layout))
    unknown = sorted(set(model or ()) - set(in_collection))
    if unknown:
        _fail(UnknownModel(f"no vectors of {', '.join(unknown)} in the collection; it has {', '.join(in_collection)}"))
    config = settings.models_config()
    versions = {}
    for name in model or in_collection:
        try:
            spec = resolve(name, config)
        except UnknownModel as exc:
            console.print(f"{name}: left out, {exc}")
            continue
        if not spec.cacheable:
            console.print(f"{name}: left out, its answers carry a transcript and are never cached")
            continue
        versions[name] = model_version(spec, config)
    report = warm_cache(store, cache, versions)
    store.close()
    cache.close()
    for line in report.lines():
        console.print(line)


@app.command("quickstart")
def quickstart(
    config: Annotated[Path | None, typer.Option(help="Serve config YAML; default: the offline models.")] = None,
    address: Annotated[str | None, typer.Option(help="Join this Ray cluster instead of starting one.")] = None,
    host: Annotated[str | None, typer.Option(help="Override http_options.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Override http_options.port.")] = None,
    scenes: Annotated[int, typer.Option(help="Rendered scenes in the demo catalogue.")] = 60,
) -> None:
    """The main job on embedded defaults: provision the offline models, start the server,
    ingest the demo catalogue (scenes, photos, spoken clips), and serve the search page."""
    import httpx

    from mmembed.demo.catalogue import build_demo_catalogue
    from mmembed.serve import launch

    settings = get_settings()
    models_pull(None)
    manifest = build_demo_catalogue(settings.data_dir.expanduser() / "demo-catalogue", scenes)
    console.print(f"demo catalogue: {manifest}")
    running = _start_server(config, address, host, port, quiet=True)
    try:
        counts = _server_job(running.url, str(manifest), "ingesting the demo catalogue")
        hits = httpx.post(f"{running.url}/search", json={"text": "red circle", "top_k": 3}, timeout=60).json()
    except Exception as exc:
        _stop_server(running)
        _fail(exc)
    console.print(
        f"demo catalogue ready: {counts['plan']['total']} items ({counts['written']} embedded now, "
        f"{counts['plan']['unchanged']} unchanged, {counts['failed']} failed)"
    )
    names = ", ".join(f"{h['payload'].get('filename')} ({h['score']:.2f})" for h in hits["hits"])
    console.print(f"try it: 'red circle' finds {names}")
    console.print(f"search page: {running.url}/  (Ctrl-C to stop)")
    launch.wait_for_signal()
    console.print("shutting down")
    _stop_server(running)


def _server_job(
    url: str,
    source: str,
    what: str,
    models: list[str] | None = None,
    sync: bool = False,
    path: str = "/ingest",
    body: dict[str, Any] | None = None,
) -> dict:
    """POST /ingest (or another job, a migration's), then follow the job to its end with a progress bar;
    its counts."""
    import time

    import httpx
    from rich.progress import Progress

    body = body or {"source": source, "models": models, "sync": sync}
    with httpx.Client(base_url=url, timeout=60) as client:
        started = client.post(path, json=body)
        if started.status_code != 202:
            raise RuntimeError(f"the server at {url} refused the job ({started.status_code}): {started.text}")
        job_url = started.json()["status_url"]
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(what, total=1.0)
            while (job := client.get(job_url).json())["status"] not in ("done", "failed"):
                progress.update(task, completed=job["progress"])
                time.sleep(0.5)  # polling a job's status: nothing to wait on
    if job["status"] == "failed":
        raise RuntimeError(f"the job on {url} failed: {job['error']}")
    return job["counts"]


ClusterFolder = Annotated[Path, typer.Option(help="Its sessions, logs and auth token.")]
ClusterPort = Annotated[int, typer.Option(help="The head's GCS port; worker n takes the 100 ports from port + 100n.")]


@cluster_app.command("up")
def cluster_up(
    folder: ClusterFolder = Path("/tmp/mmembed-cluster"),
    port: ClusterPort = 6390,
    workers: Annotated[int, typer.Option(min=1, help='Worker nodes, each declaring {"encoder": 1}.')] = 2,
    worker_cpus: Annotated[float, typer.Option(help="Logical CPUs per worker.")] = 2,
) -> None:
    """Start a head and worker nodes, each a real `ray start` with its own raylet and ports, so
    serving and bulk jobs run across nodes as on several machines."""
    from mmembed.cluster import LocalCluster

    cluster = LocalCluster(folder, port, workers, worker_cpus=worker_cpus)
    try:
        cluster.up()
    except RuntimeError as exc:
        _fail(exc)
    exports = " ".join(f"{k}={v}" for k, v in cluster.client_env().items())
    console.print(f"cluster up: {workers + 1} nodes, dashboard {cluster.dashboard_url}")
    console.print(f"join it with:  export {exports}")
    console.print(f"               mmembed serve --address {cluster.address} --config serve-cluster.yaml")


@cluster_app.command("down")
def cluster_down(folder: ClusterFolder = Path("/tmp/mmembed-cluster"), port: ClusterPort = 6390) -> None:
    """Stop every process of this cluster, and nothing else (`ray stop` would stop every Ray here)."""
    from mmembed.cluster import LocalCluster

    console.print(f"cluster down: {LocalCluster(folder, port).down()} processes stopped")


@cluster_app.command("kill")
def cluster_kill(
    node: Annotated[str, typer.Argument(help="worker-1, worker-2, ...")],
    folder: ClusterFolder = Path("/tmp/mmembed-cluster"),
    port: ClusterPort = 6390,
) -> None:
    """SIGKILL one worker node's processes, as a machine losing power: for failure drills."""
    from mmembed.cluster import LocalCluster

    killed = LocalCluster(folder, port).kill(node)
    if not killed:
        _fail(ValueError(f"no process of {node} runs in the cluster at {folder}"))
    console.print(f"{node}: {killed} processes killed")


if __name__ == "__main__":
    app()
