"""The one rule for text that comes in: it must be valid Unicode.

Python strings can hold lone UTF-16 surrogates (U+D800..U+DFFF), which JSON's
"\\ud800" escapes, `surrogateescape` decoding and some clipboards produce. UTF-8 cannot
encode them, so llama.cpp's tokenizer cannot take them. Every entrance (the API, the
magics, the service, fine-tuning data, KV session names) refuses such text with a
`BadText` error that names the field and the character, rather than guessing a
replacement the user did not ask for.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from .errors import BadText, WorkbenchError


def check_text(text: str, where: str) -> str:
    """`text`, if UTF-8 can encode it; else BadText naming `where` and the position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadText(
            f"{where} holds a lone surrogate ({ascii(text[e.start])[1:-1]}) at character "
            f"{e.start}: it is not valid Unicode text",
            "Remove or replace it (text.encode('utf-8', 'replace').decode() replaces such "
            "characters with '?'); it usually comes from a '\\ud800'-style JSON escape "
            "or from bytes decoded with errors='surrogateescape'.",
            where, e.start) from None
    return text


def jsonl_items(content: str, name: str) -> Iterator[tuple[str, Any]]:
    """("line N of NAME", the parsed value) for each non-blank line of a JSON Lines
    text; a line that is not JSON is an error that names it."""
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        where = f"line {n} of {name}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkbenchError(f"{where} is not valid JSON: {e.msg} (column {e.colno})",
                                 "Each line must be one JSON object.") from None
