"""How report.py writes a figure: numbers to 3 significant figures, spreads, markdown tables."""

from __future__ import annotations

def num(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    out = f"{v:.3g}"
    return f"{v:.6g}" if out in ("1", "-1") else out  # 0.99997 stays 0.99997


def span(s: dict) -> str:
    """" (min–max)" of a figure's spread over rounds."""
    return f" ({num(s.get('min'))}–{num(s.get('max'))})"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(num(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(lines)


def esc(text: str) -> str:
    return text.replace("|", "\\|")


# ---- store ---------------------------------------------------------------------------------------
