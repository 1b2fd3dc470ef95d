"""The request bodies. No ``from __future__ import annotations``: FastAPI reads these
classes' annotations, and the routes' that use them, as real types."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

InputType = Annotated[
    Literal["document", "query"],
    Field(
        description="query: the texts are search queries, which a text model with a query prompt (e5's "
        "'query: ') prefixes with it; document: texts to store, which get its document prompt. "
        "Models without prompts embed both alike."
    ),
]


class EmbeddingsRequest(BaseModel):
    input: str | list[str] | list[int] | list[list[int]]
    model: str
    modality: Literal["text", "image", "audio"] = Field(
        default="text",
        description="How to read the inputs; image/audio inputs are URLs, data URIs or base64. "
        "Data URIs are recognised whatever this says.",
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    input_type: InputType = "document"


class EncodeTextRequest(BaseModel):
    model: str
    texts: list[str] = Field(min_length=1)
    input_type: InputType = "document"


class EncodeMediaRequest(BaseModel):
    model: str
    items: list[str] = Field(min_length=1, description="http(s) URLs, data URIs or base64 bytes")


class IngestRequest(BaseModel):
    source: str = Field(description="A folder or manifest on the server, s3://bucket/prefix, or a .txt of URLs.")
    models: list[str] | None = Field(default=None, description="Default: every model this server runs.")
    sync: bool = Field(default=False, description="Also delete the points of items gone from the source.")
    watch: bool = Field(
        default=False,
        description="Then keep following the source (a folder's events, an S3 prefix's listings) until "
        "DELETE /jobs/{id}; implies sync.",
    )

    @field_validator("source")
    @classmethod
    def _nameable(cls, source: str) -> str:
        """A path the system can name: a NUL character or half a surrogate pair fails every call
        that gets it (a 500 where the fuzz test found it), so the request is refused at the door."""
        if not source.strip() or "\x00" in source:
            raise ValueError("a source is a non-empty path or URI with no NUL character")
        try:
            source.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a source must be valid UTF-8 text") from None
        return source


class MigrateRequest(BaseModel):
    """``from`` is a Python keyword: the field is ``from_``, spelled ``from`` on the wire."""

    model_config = ConfigDict(populate_by_name=True)

    to: str = Field(min_length=1, description="The served model whose vectors the collection moves to.")
    from_: str | None = Field(
        default=None, alias="from", description="The model it moves from; default: the one searches use now."
    )
    accept_failed: bool = Field(
        default=False, description="Switch even if some items could not be encoded; they keep their old vectors."
    )


class SearchRequest(BaseModel):
    text: str | None = None
    image: str | None = Field(default=None, description="http(s) URL, data URI or base64 bytes")
    audio: str | None = Field(default=None, description="http(s) URL, data URI or base64 bytes")
    item_id: str | None = Field(default=None, description="More like this: the item's own stored vector.")
    vector: str | None = Field(default=None, description="Named vector to search, e.g. demo-clip.image.")
    vectors: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Fuse these named vectors into one ranking, each searched with its own model's query "
        '(e.g. ["demo-clip.image", "all-MiniLM-L6-v2.text"]: the picture and the caption).',
    )
    fuse: bool = Field(default=False, description="Fuse every vector the query can search (vectors: the list).")
    fusion: Literal["rrf", "dbsf"] = Field(
        default="dbsf",
        description="How the vectors' rankings merge: distribution-based score fusion (dbsf: each vector's "
        "scores normalised, then summed; an exact match keeps its lead) or reciprocal-rank fusion (rrf: ranks only).",
    )
    via: str | None = Field(default=None, description="Model that encodes the query; default: the vector's own.")
    route: Literal["direct", "transcript"] = Field(
        default="direct", description="Audio: straight into the space (direct) or through its transcript."
    )
    top_k: int = Field(default=10, ge=1, le=1000)
    threshold: float | None = Field(default=None, description="Drop hits scoring below this.")
    filter: dict[str, Any] | None = Field(
        default=None, description='Payload filter, e.g. {"kind": "image", "meta.colour": ["red"], "size": {"lt": 1e6}}'
    )
    offset: int = Field(default=0, ge=0, description="Skip this many hits (pagination).")

    @model_validator(mode="after")
    def _one_query(self) -> "SearchRequest":
        given = [k for k in ("text", "image", "audio", "item_id") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, image, audio or item_id (got {given or 'none'})")
        if self.vector is not None and (self.vectors is not None or self.fuse):
            raise ValueError("give vector (one) or vectors/fuse (several), not both")
        if self.via is not None and (self.vectors is not None or self.fuse):
            raise ValueError("via picks the model of one vector; a fused search uses each vector's own")
        return self
