"""Messages between the kernel and the worker process.

This is the only module both sides share with each other. Every message is a
frozen dataclass carrying the protocol version and the id of the request it
belongs to; several requests may be in flight at once, so replies are matched
by id, never by order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import GenerationConfig, LoadConfig

PROTOCOL_VERSION = 9


@dataclass(frozen=True, kw_only=True)
class Message:
    id: str
    v: int = PROTOCOL_VERSION


# ---- kernel -> worker -------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class LoadModel(Message):
    path: str
    config: LoadConfig  # fully resolved: no None left for threads / n_gpu_layers


@dataclass(frozen=True, kw_only=True)
class Generate(Message):
    """Complete `prompt`: raw text (no template; BOS added as the model asks), or
    token ids used exactly as given."""
    prompt: str | tuple[int, ...]
    config: GenerationConfig


@dataclass(frozen=True, kw_only=True)
class Chat(Message):
    """Render `messages` with the model's chat template, then generate."""
    messages: tuple[tuple[str, str], ...]  # (role, content)
    config: GenerationConfig
    # the functions the model may call, as OpenAI's `tools` list in JSON text ("": none):
    # given to a template that takes `tools`, else described in the system message
    tools: str = ""


@dataclass(frozen=True, kw_only=True)
class Cancel(Message):
    target: str  # the id of the request to stop


@dataclass(frozen=True, kw_only=True)
class Unload(Message):
    pass


@dataclass(frozen=True, kw_only=True)
class Shutdown(Message):
    pass


@dataclass(frozen=True, kw_only=True)
class KVCommand(Message):
    """Prefix cache and named sessions: op is save | load | ls | rm | clear_ram | stats."""
    op: str
    name: str = ""


@dataclass(frozen=True, kw_only=True)
class LoadEmbedder(Message):
    """Load an embedding model (one whose GGUF declares a pooling type) in this worker,
    for `Embed` requests only: the worker that holds an embedder is a second one, beside
    the chat model's, so neither's context settings, batching or crashes touch the other.
    The reply is ModelLoaded."""
    path: str
    threads: int
    n_gpu_layers: int = 0
    n_batch: int = 0  # tokens per decode; 0: the model's training context, at least 512


@dataclass(frozen=True, kw_only=True)
class Embed(Message):
    """Embed each input (text, or token ids used as given) with the model's pooling,
    L2-normalized. The reply is Embeddings."""
    inputs: tuple[str | tuple[int, ...], ...]


@dataclass(frozen=True, kw_only=True)
class Score(Message):
    """Log-likelihoods (worker/score.py): each pair is (context, continuation), texts
    tokenized as lm-eval's Hugging Face model does, or token ids used as given. With
    `rolling`, each pair is (text, "") and the whole text is scored in windows. The reply
    is Scores."""
    pairs: tuple[tuple[str | tuple[int, ...], str | tuple[int, ...]], ...]
    rolling: bool = False


@dataclass(frozen=True, kw_only=True)
class ListDevices(Message):
    """The compute devices llama.cpp sees, with their free memory now."""


# ---- worker -> kernel -------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Device:
    """A device of llama.cpp's backend registry. Memory in bytes."""
    name: str
    description: str
    kind: str          # cpu | gpu | igpu | accel | meta
    memory_free: int
    memory_total: int


@dataclass(frozen=True, kw_only=True)
class Buffer:
    """One buffer llama.cpp allocates (or would, in a dry run)."""
    device: str        # llama.cpp's buffer type: CPU, CPU_Mapped, CUDA0, CUDA_Host, ...
    kind: str          # model | KV | output | compute
    bytes: int


@dataclass(frozen=True, kw_only=True)
class DeviceList(Message):
    devices: tuple[Device, ...]


@dataclass(frozen=True, kw_only=True)
class Buffers(Message):
    """What a dry run (worker/probe.py) found: the buffers a configuration needs."""
    buffers: tuple[Buffer, ...]


@dataclass(frozen=True, kw_only=True)
class WorkerReady(Message):
    pid: int
    llama_cpp_version: str
    supports_gpu_offload: bool
    system_info: str
    rss_bytes: int = 0            # the worker's memory before any model: the planner's base
    gpu_bytes: int | None = None  # GPU memory the worker holds before any model


@dataclass(frozen=True, kw_only=True)
class LoadProgress(Message):
    fraction: float


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    path: str
    name: str
    architecture: str
    quantization: str
    n_params: int
    file_bytes: int
    n_layers: int
    n_ctx_train: int
    n_ctx: int
    n_gpu_layers: int
    threads: int
    n_batch: int
    has_chat_template: bool
    load_seconds: float
    type_k: str = "f16"
    type_v: str = "f16"
    kv_bytes_per_token: int = 0  # KV cache memory per token of context, all layers
    buffers: tuple[Buffer, ...] = ()  # what llama.cpp allocated, by device
    flash_attn: str = "off"
    n_ubatch: int = 512
    # the worker's peak resident memory during the load; requests' peaks count from
    # the end of the load (0: this system could not restart the count)
    load_peak_rss_bytes: int = 0
    lora: str | None = None  # the applied LoRA adapter's path
    n_parallel: int = 1  # sequences decoded together (continuous batching)
    rpc_servers: tuple[str, ...] = ()  # cluster nodes holding layers (llama.cpp RPC)
    n_vocab: int = 0  # tokens in the vocabulary: ids are 0..n_vocab-1
    adapt_threads: bool = False  # the worker re-chooses threads from the idle cores
    # speculative decoding: off | ngram | auto, or the draft model's path
    draft: str = "off"
    draft_params: int = 0  # the draft model's parameters
    # why the draft model asked for could not be used (the model works without it)
    draft_error: str = ""
    draft_hint: str = ""


@dataclass(frozen=True, kw_only=True)
class ModelLoaded(Message):
    info: ModelInfo


@dataclass(frozen=True, kw_only=True)
class Tokens(Message):
    """Generated tokens, in order. The first token of a request travels alone, at once;
    later ones are grouped over a few tens of milliseconds, so a fast model does not pay
    a process wake-up per token."""
    pieces: tuple[str, ...]   # decoded text of each token ("" mid-way through a character)
    token_ids: tuple[int, ...]
    index: int                # index of the first of these among the generated tokens
    t: float                  # time.monotonic() in the worker when the last was produced
    # speculative decoding so far in this request: tokens drafted, and of those accepted
    drafted: int = 0
    accepted: int = 0


@dataclass(frozen=True, kw_only=True)
class RequestMetrics:
    """What one request cost. Times in seconds, rates in tokens/s, memory in bytes."""
    request_id: str
    kind: str
    model: str
    prompt_tokens: int
    prompt_seconds: float
    prompt_tps: float
    ttft_s: float           # submission to first token, measured by the worker
    generated_tokens: int
    decode_seconds: float
    decode_tps: float       # tokens after the first / time from first to last token
    total_s: float
    finish_reason: str      # stop | length | stop_string | cancelled | context_full
    rss_bytes: int
    gpu_bytes: int | None
    n_threads: int
    n_ctx: int
    wall_time: float = field(default=0.0)  # time.time() at the end
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache, not computed
    cache_tier: str = ""    # "ram" or "disk" on a hit
    peak_rss_bytes: int = 0  # the worker's peak resident memory since its model loaded
    # joules the machine's metered parts (GPUs through NVML, CPU packages through RAPL)
    # used while the request ran: machine-wide; None where nothing is metered
    energy_j: float | None = None
    # speculative decoding: tokens drafted and checked, and how many the model kept
    draft_tokens: int = 0
    accepted_tokens: int = 0
    speculative: str = ""  # the draft sources used: ngram, model, ngram+model ("": none)

    @property
    def acceptance(self) -> float | None:
        """Share of drafted tokens accepted (None when nothing was drafted)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def joules_per_token(self) -> float | None:
        if self.energy_j is None or not self.generated_tokens:
            return None
        return self.energy_j / self.generated_tokens


@dataclass(frozen=True, kw_only=True)
class TokenLogprob:
    """One generated token's log-probability (natural log, of the model's distribution
    before any sampler changed it) and the most likely tokens at its place."""
    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()  # (token, logprob), most likely first


@dataclass(frozen=True, kw_only=True)
class Finished(Message):
    text: str
    metrics: RequestMetrics
    logprobs: tuple[TokenLogprob, ...] = ()  # one per generated token, when asked for


@dataclass(frozen=True, kw_only=True)
class Failed(Message):
    """A request failed. `kind` names the WorkbenchError subclass to raise."""
    kind: str
    message: str
    hint: str


@dataclass(frozen=True, kw_only=True)
class Embeddings(Message):
    """One row per input, in order: `data` is n x dim float32, little-endian, row-major."""
    data: bytes
    n: int
    dim: int
    prompt_tokens: int
    seconds: float
    pooling: str  # mean | cls | last


@dataclass(frozen=True, kw_only=True)
class Scores(Message):
    """Per pair, in order: the continuation's tokens, each token's log-probability
    (natural log, float64) and whether every token was the most likely one."""
    tokens: tuple[tuple[int, ...], ...]
    logprobs: tuple[tuple[float, ...], ...]
    greedy: tuple[bool, ...]
    decoded: int      # tokens through the model, a prefix the pairs share counted once
    seconds: float


@dataclass(frozen=True, kw_only=True)
class Done(Message):
    """A request with no other reply (Unload, Cancel) completed."""


@dataclass(frozen=True, kw_only=True)
class KVResult(Message):
    data: dict


@dataclass(frozen=True, kw_only=True)
class Notice(Message):
    """Something the user should hear about once (e.g. the cache's disk is full)."""
    text: str


@dataclass(frozen=True, kw_only=True)
class WorkerStats(Message):
    rss_bytes: int
    gpu_bytes: int | None
    t: float
    kv: dict | None = None  # prefix cache occupancy and hit counts


REQUESTS = (LoadModel, Generate, Chat, Cancel, Unload, Shutdown, KVCommand, ListDevices,
            LoadEmbedder, Embed, Score)
REPLIES = (WorkerReady, LoadProgress, ModelLoaded, Tokens, Finished, Failed, Done, WorkerStats,
           KVResult, Notice, DeviceList, Buffers, Embeddings, Scores)


def check(msg: object, expected: tuple[type, ...]) -> Message:
    """Reject anything that is not a known message of this protocol version."""
    if not isinstance(msg, expected):
        raise TypeError(f"unknown engine message: {msg!r}")
    if msg.v != PROTOCOL_VERSION:  # type: ignore[attr-defined]
        raise TypeError(f"engine protocol version {msg.v} != {PROTOCOL_VERSION}")  # type: ignore
    return msg  # type: ignore[return-value]
