"""Human messages for error codes, in English and Simplified Chinese.

The machine code is the same in every language; only the message changes.
"""

from __future__ import annotations

MESSAGES: dict[str, tuple[str, str]] = {
    # code: (English, 简体中文)
    "bad_request": ("The request is not valid.", "请求无效。"),
    "invalid_json": ("The body is not valid JSON.", "请求体不是有效的 JSON。"),
    "invalid_form": ("The form data is not valid.", "表单数据无效。"),
    "unsupported_media_type": (
        "Send JSON or multipart/form-data.",
        "请使用 JSON 或 multipart/form-data 格式。",
    ),
    "empty_prompt": ("The prompt must not be empty.", "提示词不能为空。"),
    "prompt_too_long": ("The prompt is too long.", "提示词过长。"),
    "invalid_fingerprint": (
        "The fingerprint must be 8 to 256 characters of letters, digits, '_' or '-'.",
        "指纹必须是 8 到 256 个字母、数字、下划线或连字符。",
    ),
    "empty_image": ("The reference image is empty.", "参考图不能为空。"),
    "invalid_image": (
        "The reference image must be a PNG, JPEG, WebP or GIF image.",
        "参考图必须是 PNG、JPEG、WebP 或 GIF 图片。",
    ),
    "too_many_files": ("Send at most one reference image.", "最多只能上传一张参考图。"),
    "invalid_direction": (
        "The direction must be 'details' or 'creative'.",
        "优化方向必须是 details 或 creative。",
    ),
    "no_credits": (
        "No credits left. Check in to receive today's credits.",
        "额度不足，请先签到领取今日额度。",
    ),
    "not_found": ("Not found.", "未找到。"),
    "image_not_ready": ("The image is not available.", "图片不存在或尚未生成。"),
    "payload_too_large": ("The request body is too large.", "请求体过大。"),
    "image_too_large": (
        "The reference image is larger than the allowed size.",
        "参考图超过允许的大小。",
    ),
    "upstream_failed": (
        "The image service failed. Please try again.",
        "图片服务出错，请稍后重试。",
    ),
    "upstream_timeout": (
        "The image service did not answer in time.",
        "图片服务响应超时，请稍后重试。",
    ),
    "upstream_unavailable": ("The image service is unavailable.", "图片服务暂不可用。"),
    "upstream_not_configured": ("The image service is unavailable.", "图片服务暂不可用。"),
    "not_ready": ("The service is not ready.", "服务尚未就绪。"),
    "method_not_allowed": ("Method not allowed.", "不支持该请求方法。"),
    "internal_error": ("Internal error.", "服务器内部错误。"),
}


def message_for(code: str, *, chinese: bool = False) -> str:
    english, zh = MESSAGES.get(code, MESSAGES["bad_request"])
    return zh if chinese else english


def prefers_chinese(accept_language: str | None) -> bool:
    """True when the highest-weighted language of an Accept-Language header is Chinese."""
    if not accept_language:
        return False
    best_q, best_lang = -1.0, ""
    for item in accept_language.split(","):
        lang, _, params = item.strip().partition(";")
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        if lang and q > best_q:
            best_q, best_lang = q, lang.strip().lower()
    return best_lang == "zh" or best_lang.startswith("zh-")
