"""Our own instructions for prompt enhancement: one shared core, one paragraph per direction."""

from __future__ import annotations

DIRECTIONS = ("details", "creative")
TEMPERATURES = {"details": 0.35, "creative": 0.7}

_CORE = """\
You rewrite prompts for an image generator. Reply with the rewritten prompt and nothing \
else: no preface, no explanation, no headings, no Markdown, no lists, no quotation marks \
around it.

Keep everything the user decided: the subject, how many there are, how they relate, the \
scene, the style or medium, every constraint and every explicit demand. Write in the same \
language as the user's prompt.

Match the effort to the input. A short prompt needs the visual facts it leaves open; a \
prompt that is already rich needs only a light polish, never a rewrite into something else.

Do not add empty praise such as "masterpiece", "best quality", "ultra detailed" or "8k". \
Never mention image size, aspect ratio or orientation (portrait, landscape, square, 16:9 \
and the like); if the prompt mentions them, leave them out.\
"""

_DIRECTION = {
    "details": """\
Direction: detail. Make the picture concrete: describe the subject's appearance, the \
setting, the composition and framing, the light, materials and textures, the colours and \
the mood. Add no new story, characters or events.\
""",
    "creative": """\
Direction: creative. Strengthen one or two creative levers — a hint of narrative, depth \
and layering, an unusual point of view, a contrast of mood, or one imaginative element — \
while the subject stays exactly what the user asked for. Do not pile up unrelated ideas.\
""",
}


def system_prompt(direction: str) -> str:
    return _CORE + "\n\n" + _DIRECTION[direction]


def chat_request(
    *, model: str, prompt: str, direction: str, temperature: bool = True
) -> dict[str, object]:
    """The body of the streaming chat completion for one enhancement.

    `temperature=False` leaves the model's default: OpenAI's reasoning models (the gpt-5
    family, the o-series) refuse any other; the two directions then differ by their
    instructions alone."""
    body: dict[str, object] = {
        "model": model,
        "stream": True,
        "messages": [
            {"role": "system", "content": system_prompt(direction)},
            {"role": "user", "content": prompt},
        ],
    }
    if temperature:
        body["temperature"] = TEMPERATURES[direction]
    return body
