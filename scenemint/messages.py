"""Human messages for error codes, in English and Simplified Chinese.

The machine code is the same in every language; only the message changes.
"""

from __future__ import annotations

MESSAGES: dict[str, tuple[str, str]] = {
    # code: (English, 简体中文)
    "bad_request": ("The request is not valid.", "请求无效。"),
    "invalid_json": ("The body must be a JSON object.", "请求体必须是一个 JSON 对象。"),
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
        "The reference image is too large.",
        "参考图过大。",
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
    "store_unavailable": (
        "The service cannot reach its database. Please try again in a moment.",
        "服务暂时无法访问数据库，请稍后重试。",
    ),
    "image_store_unavailable": (
        "The image storage is unavailable. Please try again in a moment.",
        "图片存储暂时不可用，请稍后重试。",
    ),
    "image_expired": (
        "This image has expired and was deleted.",
        "该图片已过期并被删除。",
    ),
    "image_unavailable": (
        "The finished image could not be retrieved. Your credit was returned.",
        "无法获取生成的图片，额度已退回。",
    ),
    "store_rejected": (
        "The request holds data the service cannot store.",
        "请求包含服务无法保存的数据。",
    ),
    "invalid_idempotency_key": (
        "The Idempotency-Key header must be 1 to 255 printable ASCII characters.",
        "Idempotency-Key 请求头必须是 1 到 255 个可打印的 ASCII 字符。",
    ),
    "idempotency_key_reused": (
        "This Idempotency-Key was already used for a different request.",
        "该 Idempotency-Key 已用于另一个不同的请求。",
    ),
    "idempotency_in_progress": (
        "A request with this Idempotency-Key is still being processed. Try again shortly.",
        "使用该 Idempotency-Key 的请求仍在处理中，请稍后重试。",
    ),
    "invalid_text": (
        "The text contains characters that are not allowed (NUL or unpaired surrogates).",
        "文本包含不允许的字符（NUL 或不成对的代理字符）。",
    ),
    "json_too_deep": ("The JSON body is nested too deeply.", "JSON 请求体嵌套层数过多。"),
    "path_too_long": ("The request path is too long.", "请求路径过长。"),
    "headers_too_large": (
        "The request headers are too large (at most 64 KiB).",
        "请求头过大（最多 64 KiB）。",
    ),
    "request_timeout": (
        "The request did not arrive in time.",
        "请求未能及时到达。",
    ),
    "too_many_connections": (
        "The server is busy. Please try again shortly.",
        "服务器繁忙，请稍后重试。",
    ),
    # prompt enhancement: its own words, never "the image service failed"
    "enhance_failed": (
        "The prompt enhancement failed. Please try again.",
        "提示词优化失败，请稍后重试。",
    ),
    "enhance_timeout": (
        "The prompt enhancement did not answer in time. Please try again.",
        "提示词优化响应超时，请稍后重试。",
    ),
    "enhance_unavailable": (
        "Prompt enhancement is unavailable right now.",
        "提示词优化暂不可用。",
    ),
    "enhance_not_configured": (
        "Prompt enhancement is not set up on this server.",
        "本服务器未配置提示词优化。",
    ),
    "enhance_interrupted": (
        "The prompt enhancement stream was interrupted.",
        "提示词优化的输出被中断。",
    ),
    "enhance_too_long": (
        "The prompt enhancement took too long and was stopped.",
        "提示词优化耗时过长，已停止。",
    ),
    "server_restarting": (
        "The server is restarting. Please try again.",
        "服务器正在重启，请稍后重试。",
    ),
    # why a task failed (the `error` of a failed task; its credit was given back)
    "task_unknown": ("task not found or expired", "任务不存在或已过期"),
    "task_expired": (
        "The image service lost this task before it finished (it may have restarted)."
        " Your credit was returned.",
        "图片服务在任务完成前丢失了该任务（可能已重启），额度已退回。",
    ),
    "generation_failed": ("The image generation failed.", "图片生成失败。"),
    "submit_refused": (
        "The image service refused the task. Your credit was returned.",
        "图片服务拒绝了该任务，额度已退回。",
    ),
    "not_delivered": (
        "The request was interrupted before its answer was sent. Your credit was returned.",
        "请求在返回结果前被中断，额度已退回。",
    ),
    "task_lost": (
        "The image service never received the task. Your credit was returned.",
        "图片服务未收到该任务，额度已退回。",
    ),
    "timed_out": (
        "The generation took too long and was abandoned. Your credit was returned.",
        "生成耗时过长，已放弃，额度已退回。",
    ),
    "no_image": (
        "The image service finished without an image. Your credit was returned.",
        "图片服务完成了任务但没有返回图片，额度已退回。",
    ),
    "reference_lost": (
        "The reference image was lost before the task could be sent. Your credit was returned.",
        "参考图在任务提交前丢失，额度已退回。",
    ),
    "content_policy": (
        "The image provider's safety system refused this prompt. Your credit was returned.",
        "图片服务的安全系统拒绝了该提示词，额度已退回。",
    ),
    "generation_interrupted": (
        "The generation was interrupted before it answered. Your credit was returned.",
        "生成在返回结果前被中断，额度已退回。",
    ),
    "internal_error": ("Internal error.", "服务器内部错误。"),
}


def message_for(code: str, *, chinese: bool = False) -> str:
    english, zh = MESSAGES.get(code, MESSAGES["bad_request"])
    return zh if chinese else english


def limit_sentence(limit: int, *, chinese: bool = False) -> str:
    """What a "too large" message adds: the limit, in the reader's language."""
    size = _bytes_for_people(limit)
    return f"上限为 {size}。" if chinese else f" The limit is {size}."


def _bytes_for_people(count: int) -> str:
    for unit, factor in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if count >= factor:
            value = count / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{count} bytes"


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
