"""Rewriting a GGUF file with the `gguf` package: the same metadata (some values
replaced), tensors given one by one. Child processes only (it imports numpy)."""

from __future__ import annotations

from typing import Any


def writer_like(src: str, dst: str, replace: dict[str, Any]) -> tuple[Any, Any]:
    """(reader of `src`, writer of `dst` holding `src`'s metadata with `replace` applied;
    a key named "{arch}" in `replace` is read as the architecture's prefix)."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    replace = {k.replace("{arch}", arch): v for k, v in replace.items()}
    w = gguf.GGUFWriter(dst, arch)
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = fld.types[0]
        w.add_key_value(key, replace.get(key, fld.contents()), vtype,
                        sub_type=fld.types[1] if vtype == gguf.GGUFValueType.ARRAY else None)
    return reader, w


def finish(w: Any) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
