// Calls to the service from the page: the API key (when the service asks for one) and errors
// turned into sentences a person can read.

const KEY_STORAGE = "gradcam.apiKey";

/** A failed call, with a sentence to show; `needsKey` when the service asks for an API key. */
export class ApiError extends Error {
  constructor(title, sentence, { status = 0, code = null, needsKey = false } = {}) {
    super(sentence);
    this.title = title;
    this.status = status;
    this.code = code;
    this.needsKey = needsKey;
  }
}

/** The API key of this tab, if one was given (sessionStorage only: gone with the tab). */
export function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function storeKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

function retryHint(response) {
  const seconds = Number(response.headers.get("Retry-After"));
  return seconds > 0 ? ` Try again in ${seconds} s.` : "";
}

// "image 0: " names the image of a multi-image request; the page sends one.
function cleanDetail(detail) {
  return String(detail).replace(/^image 0: /, "");
}

async function errorOf(response) {
  const type = response.headers.get("Content-Type") || "";
  let problem = null;
  if (type.includes("json")) {
    try {
      problem = await response.json();
    } catch {
      problem = null;
    }
  }
  const bearer = /^\s*bearer\b/i.test(response.headers.get("WWW-Authenticate") || "");
  const needsKey = response.status === 401 && bearer;
  const title = (problem && problem.title) || `${response.status} ${response.statusText}`.trim();
  let sentence;
  if (problem && problem.detail) {
    sentence = cleanDetail(problem.detail);
  } else if (needsKey) {
    sentence = "This service needs an API key.";
  } else {
    sentence = `The service answered ${response.status} ${response.statusText}.`.replace(" .", ".");
  }
  if (needsKey) {
    sentence += storedKey()
      ? " Enter another one in the API key field."
      : " Enter it in the API key field, then press Use key.";
  }
  // The service's own sentence may already say when to retry ("retry after 1 s."): once only.
  if (!/\bretry after\b/i.test(sentence)) sentence += retryHint(response);
  return new ApiError(title, sentence, {
    status: response.status,
    code: problem ? problem.code : null,
    needsKey,
  });
}

/** GET or POST `path` on this origin; the answer's JSON, or an ApiError. */
export async function call(path, { body = null, signal = undefined } = {}) {
  const headers = {};
  const key = storedKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(path, { method: body ? "POST" : "GET", body, headers, signal });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(
      "The service could not be reached",
      "The request did not reach the service or no answer came back. Check that it is"
        + " running and try again.",
    );
  }
  if (!response.ok) throw await errorOf(response);
  return response.json();
}
