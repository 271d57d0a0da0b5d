"""The server's exception tree; `api.py` turns each into OpenAI's error JSON in one place.

    ServerError                       500 server_error
    ├── InvalidRequestError           400 invalid_request_error
    │   ├── ContextLengthExceededError 400 code=context_length_exceeded
    │   └── RequestTooLargeError       413
    ├── AuthenticationError           401 authentication_error
    ├── PermissionDeniedError         403 permission_error
    ├── NotFoundError                 404 invalid_request_error
    │   └── ModelNotFoundError         404 code=model_not_found
    ├── ServerOverloadedError         429 rate_limit_error (carries Retry-After)
    ├── ServiceUnavailableError       503 service_unavailable
    └── EngineError                   500 a failure inside generation

No module here imports the web framework or MLX: the engine and the service raise these too.
"""

from __future__ import annotations


class ServerError(Exception):
    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def to_dict(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(ServerError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class RequestTooLargeError(InvalidRequestError):
    status_code = 413
    default_code = "request_too_large"


class AuthenticationError(ServerError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(ServerError):
    status_code = 403
    error_type = "permission_error"


class NotFoundError(ServerError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"


class ServerOverloadedError(ServerError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "server_overloaded"

    def __init__(self, message: str, *, retry_after_seconds: int = 1):
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class ServiceUnavailableError(ServerError):
    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"


class EngineError(ServerError):
    """Generation failed for one request; the engine keeps serving the others."""

    default_code = "engine_error"
