// The clip-sidecar search page: calls the API like any client; writes text into the page, never HTML.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const form = $('search-form');
  const state = {
    image: null,    // {dataUrl, name, previewUrl}: the query image
    like: null,     // {id, text}: "more like this" of a stored document
    query: null,    // {text, image, like} of the search shown: what its other pages and rankings are of
    offset: 0,
    thumbUrls: [],  // blob: URLs of the thumbnails fetched, released on the next render
    facetsShown: false,  // the filters' controls were built from the store's facets
    // {field: value} of a URL shown before the facets arrived (they need a key): set then, on the URL's own search
    // only, so a query changed meanwhile drops them (dropUrlFilters).
    wantedFilters: null,
  };
  const KEY_STORAGE = 'clip-sidecar-api-key';
  // The filter option that opens a box for a value the facets do not list (they list each field's 20 most
  // frequent); never an option's JSON value, which is quoted, a number, a boolean or null.
  const OTHER_VALUE = 'other';

  // ---- talking to the API -------------------------------------------------------------------

  class ApiProblem extends Error {
    constructor(status, code, message, retryAfter, answer) {
      super(message);
      Object.assign(this, { status, code, retryAfter, answer });  // answer: the JSON body, where there was one
    }
  }

  function headers(extra) {
    const key = $('api-key').value.trim();
    return Object.assign(key ? { Authorization: `Bearer ${key}` } : {}, extra || {});
  }

  // How long a call waits for its answer (the whole of it, body included) before the page gives up on it: the
  // server's encode deadline (request_timeout_s, in /readyz's details) and the 30 s the server allows the rest of
  // a request that ran to it (gunicorn's graceful_timeout). Until /readyz has said, the setting's default (30 s).
  // A server that never answers would otherwise leave the page searching forever.
  const ANSWER_MARGIN_S = 30;
  let requestTimeoutS = 30;

  function answerWaitS() {
    return requestTimeoutS + ANSWER_MARGIN_S;
  }

  // `cancel`: an AbortSignal of the caller's (a newer search supersedes this one), which rejects with its AbortError.
  async function api(path, body, cancel) {
    const waitS = answerWaitS();
    const controller = new AbortController();
    let timedOut = false;
    const timer = setTimeout(() => { timedOut = true; controller.abort(); }, waitS * 1000);
    const cancelled = () => controller.abort();
    if (cancel) cancel.addEventListener('abort', cancelled, { once: true });
    let response;
    let data = null;
    try {
      try {
        response = await fetch(path, body === undefined ? { headers: headers(), signal: controller.signal } : {
          method: 'POST', headers: headers({ 'Content-Type': 'application/json' }), body: JSON.stringify(body),
          signal: controller.signal,
        });
        data = await response.json();
      } catch (err) {
        if (timedOut) throw new ApiProblem(0, 'timeout', `no answer within ${waitS} s (the server may be overloaded or stuck). Try again`);
        if (cancel && cancel.aborted) throw err;
        if (!response) throw new ApiProblem(0, 'unreachable', `the server does not answer (${err.message}). Is clip-sidecar still running?`);
        data = null;  // an answer that is not JSON (a proxy's error page): its HTTP status says what went wrong
      }
    } finally {
      clearTimeout(timer);
      if (cancel) cancel.removeEventListener('abort', cancelled);
    }
    if (!response.ok) {
      // Errors are {"error": {"code", "message"}}; /readyz says {"status": "not_ready", "reason"} (the reason only
      // to a caller with a key).
      const error = (data && data.error) || {};
      throw new ApiProblem(response.status, error.code || (data && data.status) || 'error',
        error.message || (data && data.reason) || response.statusText, response.headers.get('Retry-After'), data);
    }
    return data;
  }

  // What a person should read for each kind of failure; the server's message names the field and limit.
  function explain(problem) {
    const retry = problem.retryAfter ? ` Try again in ${problem.retryAfter} s.` : '';
    const titles = {
      0: 'Cannot reach the server:',
      400: 'The request was refused:',
      401: 'This server needs an API key: enter it under “API key” in the search options.',
      403: 'This API key may not do that:',
      404: 'Not found:',
      413: 'Too large:',
      415: 'Not an image the server can read:',
      429: 'Too many requests:',
      502: 'The store answered with an error:',
      504: 'The server took too long:',
    };
    let title = titles[problem.status] || `Error ${problem.status}:`;
    if (problem.code === 'timeout' && problem.status === 0) title = 'The server did not answer:';
    if (problem.code === 'incomplete') title = 'Nothing to search yet:';  // the page's own check: nothing was sent
    if (problem.status === 503) {
      title = { store_unavailable: 'The store cannot be reached right now:', not_ready: 'The server is not ready:' }[
        problem.code] || 'The server is busy:';
    }
    const message = /[.!?]$/.test(problem.message) ? problem.message : `${problem.message}.`;
    return { title, detail: `${message}${retry}` };
  }

  // The title and text of anything thrown: an Error's own message (its String() would say "Error:" once more).
  function describe(problem) {
    if (problem instanceof ApiProblem) return explain(problem);
    return { title: 'Error:', detail: problem instanceof Error ? problem.message : String(problem) };
  }

  // A missing or refused key: open the key's box, so the field to fix is in sight (and next in focus order).
  function askForKey(problem) {
    if (problem instanceof ApiProblem && problem.status === 401) $('key-settings').open = true;
  }

  function showError(problem) {
    askForKey(problem);
    const box = $('error');
    const { title, detail } = describe(problem);
    box.replaceChildren(el('strong', {}, title), ` ${detail}`);
    box.hidden = false;
  }

  function clearError() {
    state.infoRefused = false;  // what the box said is gone: loadInfo must not clear a newer error
    $('error').hidden = true;
    $('error').replaceChildren();
  }

  // ---- small DOM helpers ----------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === 'class') node.className = value;
      else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value);
    }
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  function format(value) {
    if (typeof value === 'number') return Number.isInteger(value) ? String(value) : value.toFixed(3);
    return typeof value === 'object' ? JSON.stringify(value) : String(value);
  }

  function score(value) {
    return value.toFixed(3);
  }

  function thumbnailUrl(id) {
    return `/v1/documents/${encodeURIComponent(id)}/thumbnail`;
  }

  // A page of thumbnails is a burst of requests against the key's rate limit. Those it refuses (429)
  // are fetched again one at a time, none before the latest Retry-After: the limit then lets each
  // through as a token comes back, instead of refusing them all again at once. A thumbnail refused
  // THUMB_RETRIES more times (other clients spending the same key) is shown missing.
  const THUMB_RETRIES = 5;
  let thumbRetries = Promise.resolve();  // the queue: each retry starts when the one before it ended
  let thumbNotBefore = 0;  // performance.now() of the latest Retry-After's end
  let thumbLoads = new AbortController();  // aborted when the results whose thumbnails it loads are replaced

  function retryAfterMs(response) {
    const seconds = Number(response.headers.get('Retry-After'));  // whole seconds from this server
    return (Number.isFinite(seconds) && seconds > 0 ? seconds : 1) * 1000;
  }

  // One try at a thumbnail: {response, blob} (the blob where it was sent). Given up on (rejected) after the wait
  // any call gets (answerWaitS), body included: an <img> has no timeout, and one hung request would leave its
  // placeholder on the page for good. `cancel`: the AbortSignal of the results it is for (thumbLoads), which
  // rejects with its AbortError.
  async function fetchThumbnail(id, cancel) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), answerWaitS() * 1000);
    const cancelled = () => controller.abort();
    cancel.addEventListener('abort', cancelled, { once: true });
    try {
      const response = await fetch(thumbnailUrl(id), { headers: headers(), signal: controller.signal });
      return { response, blob: response.ok ? await response.blob() : null };
    } finally {
      clearTimeout(timer);
      cancel.removeEventListener('abort', cancelled);
    }
  }

  // Resolves after `ms`, or as soon as `cancel` aborts: a retry of results replaced must not hold up the queue.
  function waitUnlessCancelled(ms, cancel) {
    return new Promise((resolve) => {
      const timer = setTimeout(() => { cancel.removeEventListener('abort', cancelled); resolve(); }, ms);
      const cancelled = () => { clearTimeout(timer); resolve(); };
      cancel.addEventListener('abort', cancelled, { once: true });
    });
  }

  function retryRateLimited(id, refused, cancel) {
    thumbNotBefore = Math.max(thumbNotBefore, performance.now() + retryAfterMs(refused.response));
    const turn = thumbRetries.then(async () => {
      let answer = refused;
      for (let tries = 0; tries < THUMB_RETRIES && !cancel.aborted; tries += 1) {
        await waitUnlessCancelled(thumbNotBefore - performance.now(), cancel);
        if (cancel.aborted) break;  // a newer answer replaced the results: no request for it
        answer = await fetchThumbnail(id, cancel);
        if (answer.response.status !== 429) break;
        thumbNotBefore = performance.now() + retryAfterMs(answer.response);
      }
      return answer;
    });
    thumbRetries = turn.catch(() => {});  // a failed fetch must not stop the thumbnails queued after it
    return turn;
  }

  // An <img> of a stored document, its bytes fetched (fetchThumbnail): an <img> sends no API key, and waits forever.
  function thumbnail(id, alt) {
    const img = el('img', { class: 'thumb', alt, width: '128', height: '128', decoding: 'async' });
    const missing = () => img.replaceWith(el('div', { class: 'thumb no-thumb', role: 'img', 'aria-label': alt }, 'no thumbnail'));
    img.addEventListener('error', missing, { once: true });
    const cancel = thumbLoads.signal;
    fetchThumbnail(id, cancel)
      .then((answer) => (answer.response.status === 429 ? retryRateLimited(id, answer, cancel) : answer))
      .then(({ response, blob }) => (blob || Promise.reject(new Error(String(response.status)))))
      .then((blob) => { const url = URL.createObjectURL(blob); state.thumbUrls.push(url); img.src = url; })
      .catch(() => { if (!cancel.aborted) missing(); });  // cancelled: its results are gone, nothing went wrong
    return img;
  }

  // Results replaced: the thumbnails still loading for them are cancelled, those waiting to be retried included, so
  // they neither spend the key's rate limit nor hold up the new results' thumbnails.
  function releaseThumbnails() {
    thumbLoads.abort();
    thumbLoads = new AbortController();
    state.thumbUrls.forEach((url) => URL.revokeObjectURL(url));
    state.thumbUrls = [];
  }

  // ---- the request from the controls -----------------------------------------------------------

  function findCaptions() {
    return document.querySelector('input[name="find"]:checked').value === 'captions';
  }

  function filtersFromControls() {
    const filters = {};
    for (const select of $('filters').querySelectorAll('select')) {
      if (select.value === OTHER_VALUE) {
        const typed = $(`${select.id}-other`);
        const text = typed.value.trim();
        // A filter matches values of its own JSON type only: a number typed for a field of numbers is a number.
        if (text) filters[select.dataset.field] = typed.dataset.numbers && Number.isFinite(Number(text)) ? Number(text) : text;
      } else if (select.value !== '') {
        filters[select.dataset.field] = JSON.parse(select.value);
      }
    }
    return filters;
  }

  function number(id) {
    const raw = $(id).value.trim();
    return raw === '' ? null : Number(raw);
  }

  function searchBody() {
    const body = { k: Number($('page-size').value), offset: state.offset };
    const { text, image, like } = state.query;
    if (text) body.text = text;
    if (image) body.image = image.dataUrl;
    if (like) body.like = like.id;
    if ($('mode').value) body.mode = $('mode').value;
    body.fusion = $('fusion').value;
    const weights = { vector: number('weight-vector'), bm25: number('weight-bm25') };
    if (weights.vector !== null && weights.bm25 !== null) body.weights = weights;
    const candidates = number('candidates');
    if (candidates !== null) body.candidates = candidates;
    if ($('rerank').value) body.rerank = $('rerank').value === 'on';
    if ($('exact').checked) body.exact = true;
    const filters = filtersFromControls();
    if (Object.keys(filters).length) body.filters = filters;
    return body;
  }

  function captionsBody() {
    const body = { k: Number($('page-size').value) };
    const { image, like } = state.query;
    if (image) body.image = image.dataUrl;
    if (like) body.like = like.id;
    const candidates = number('candidates');
    if (candidates !== null) body.candidates = candidates;
    if ($('exact').checked) body.exact = true;
    const filters = filtersFromControls();
    if (Object.keys(filters).length) body.filters = filters;
    return body;
  }

  function hasQuery() {
    return Boolean($('query').value.trim() || state.image || state.like);
  }

  // ---- running a search ---------------------------------------------------------------------------

  let generation = 0;  // answers to a superseded request are dropped
  let searching = null;  // the AbortController of the search in flight

  // A newer search, or none (an entry of the history without one): the one in flight is cancelled, so its answer
  // can neither arrive after the newer one's nor keep the server busy. Returns the newer one's generation.
  function supersede() {
    if (searching) searching.abort();
    searching = new AbortController();
    return ++generation;
  }

  // paging: another page of the query shown (state.query), not of what the query box holds meanwhile; again: the
  // query shown from its first page, ranked or filtered as the controls now say. record: 'push' a history entry
  // (a new search, another page), 'replace' the current one (the same search ranked another way), or none.
  async function run({ focusResults = false, paging = false, again = false, record = 'push' } = {}) {
    const captions = !paging && findCaptions();  // pages are of images found; captions come in one list
    if (!paging) {
      const query = again ? state.query : { text: $('query').value.trim(), image: state.image, like: state.like };
      if (!query.text && !query.image && !query.like) {
        showError(new ApiProblem(0, 'incomplete', 'type some text, choose an image, or pick “More like this” on a result.'));
        return;
      }
      if (captions && !query.image && !query.like) {
        showError(new ApiProblem(0, 'incomplete', 'captions describe an image: choose one, or pick “More like this” on a result.'));
        return;
      }
      state.query = query;
    }
    if (record) recordInUrl(captions, record);
    const mine = supersede();
    const { signal } = searching;
    clearError();
    $('status').textContent = 'Searching…';
    // The search button stays enabled: disabled, it would drop keyboard focus to <body> (and Enter in the query
    // box would do nothing); a search started meanwhile supersedes this one (`generation`).
    $('results').setAttribute('aria-busy', 'true');
    document.body.classList.add('busy');
    const started = performance.now();
    try {
      const answer = captions ? await api('/v1/captions', captionsBody(), signal) : await api('/v1/search', searchBody(), signal);
      if (mine !== generation) return;
      state.keyRefused = false;  // nothing refused to run again when a key is typed next
      const roundTrip = performance.now() - started;
      if (captions) renderCaptions(answer, roundTrip);
      else renderHits(answer, roundTrip);
      if (focusResults) $('results').focus();
    } catch (problem) {
      if (mine !== generation) return;
      renderNothing();
      $('status').textContent = 'The search failed.';
      state.keyRefused = problem instanceof ApiProblem && (problem.status === 401 || problem.status === 403);
      showError(problem);
    } finally {
      if (mine === generation) {
        $('results').removeAttribute('aria-busy');
        document.body.classList.remove('busy');
      }
    }
  }

  function renderNothing() {
    releaseThumbnails();
    $('rerank-note').hidden = true;
    $('hits').replaceChildren();
    $('captions').replaceChildren();
    $('pager').hidden = true;
    $('latency').hidden = true;
    $('empty').hidden = false;
    $('empty').textContent = 'No results to show.';
  }

  function renderLatency(tookMs, roundTrip) {
    const dl = $('latency');
    const parts = Object.entries(tookMs).map(([stage, ms]) => [stage, `${ms.toFixed(1)} ms`]);
    parts.push(['round trip', `${roundTrip.toFixed(0)} ms`]);
    dl.replaceChildren(el('dt', { class: 'latency-title' }, 'Latency'),
      ...parts.flatMap(([stage, value]) => [el('dt', {}, stage), el('dd', { 'data-stage': stage }, value)]));
    dl.hidden = false;
  }

  function renderHits(answer, roundTrip) {
    releaseThumbnails();
    const hits = answer.hits;
    const first = answer.offset + 1;
    $('captions').hidden = true;
    $('captions').replaceChildren();
    $('hits').hidden = false;
    $('hits').start = first;
    $('hits').replaceChildren(...hits.map((hit, i) => renderHit(hit, answer.offset + i + 1)));
    $('empty').hidden = hits.length > 0;
    // A page past the ranking's end (an old or edited URL) is not a search that matched nothing.
    $('empty').textContent = answer.offset > 0 ? `No results past result ${answer.offset}: the ranking ends there.`
      : 'No documents match.';
    const range = hits.length ? `Results ${first}–${answer.offset + hits.length}` : 'No results';
    const notes = [`mode ${answer.mode}`];
    if (answer.mode === 'hybrid') notes.push(`fusion ${answer.fusion}`);
    notes.push(rerankNote(answer));
    // A last page shorter than the page size, said to end at the server's limit, not at the ranking's end.
    if (answer.cut_at_max_k) {
      notes.push(`stopped at result ${answer.offset + hits.length}, the most a search ranks (max_k)`);
    }
    $('status').textContent = `${range} (${notes.join(', ')}).`;
    $('rerank-note').textContent = answer.rerank_skipped ? `Rerank skipped: ${answer.rerank_skipped}.` : '';
    $('rerank-note').hidden = !answer.rerank_skipped;
    renderLatency(answer.took_ms, roundTrip);
    const pager = $('pager');
    pager.hidden = answer.offset === 0 && answer.next_offset === undefined;
    $('prev-page').disabled = answer.offset === 0;
    $('next-page').disabled = answer.next_offset === undefined;
    $('next-page').dataset.offset = answer.next_offset === undefined ? '' : String(answer.next_offset);
    $('page-info').textContent = hits.length ? `${range.replace('Results ', '')}` : '';
  }

  // The fine stage ranks the first `candidates` of the ranking; a page reaching past them shows the rest in
  // coarse order (those hits carry no rerank score), which "reranked" alone would hide.
  function rerankNote(answer) {
    if (!answer.rerank) return 'no rerank';
    const reranked = answer.hits.filter((hit) => hit.scores.rerank !== undefined).length;
    if (reranked === answer.hits.length) return `reranked by ${answer.fine_model}`;
    if (reranked === 0) return `coarse order: past the candidates ${answer.fine_model} reranked`;
    return `first ${reranked} reranked by ${answer.fine_model}, the rest past the candidates in coarse order`;
  }

  function renderHit(hit, rank) {
    const label = hit.text || hit.id;
    const scores = el('dl', { class: 'scores', 'aria-label': 'Scores by stage' },
      ...Object.entries(hit.scores).flatMap(([stage, value]) => [
        el('dt', {}, stage), el('dd', { 'data-stage': stage }, score(value))]));
    const metadata = el('dl', { class: 'metadata', 'aria-label': 'Metadata' },
      ...Object.entries(hit.metadata).flatMap(([name, value]) => [el('dt', {}, name), el('dd', {}, format(value))]));
    const liked = state.like && state.like.id === hit.id;
    return el('li', { class: liked ? 'hit liked' : 'hit', 'data-id': hit.id },
      thumbnail(hit.id, label),
      el('p', { class: 'caption' }, hit.text || '(no text)'),
      el('p', { class: 'doc-id muted' }, `#${rank} · ${hit.id}${liked ? ' · the document you picked' : ''}`),
      el('p', { class: 'score' }, `score ${score(hit.score)}`),
      scores,
      Object.keys(hit.metadata).length ? metadata : null,
      el('button', { type: 'button', class: 'more', 'aria-label': `More like this: ${label}`,
        onclick: () => moreLikeThis(hit) }, 'More like this'));
  }

  function renderCaptions(answer, roundTrip) {
    releaseThumbnails();
    $('rerank-note').hidden = true;
    $('hits').hidden = true;
    $('hits').replaceChildren();
    $('pager').hidden = true;
    const list = $('captions');
    list.hidden = false;
    list.replaceChildren(...answer.captions.map((caption) => el('li', { class: 'caption-hit' },
      el('p', { class: 'caption' }, caption.text),
      el('p', { class: 'score' }, `score ${score(caption.score)}`),
      el('p', { class: 'muted' }, caption.ids.length === 1 ? '1 document with this text' : `${caption.ids.length} documents with this text`),
      el('div', { class: 'strip' }, ...caption.ids.slice(0, 4).map((id) => thumbnail(id, `${caption.text} (${id})`))))));
    $('empty').hidden = answer.captions.length > 0;
    $('empty').textContent = 'No captions found near this image.';
    $('status').textContent = `${answer.captions.length} captions that describe the image, best first.`;
    renderLatency(answer.took_ms, roundTrip);
  }

  // ---- the search in the URL ------------------------------------------------------------------------
  // Each search and each page of one is a history entry, its request in the fragment (never sent to the server):
  // back and forward step through them, and the URL shared or reloaded shows them again. Changing how the search
  // shown is ranked or filtered updates its entry instead: back leaves the search, not the last option touched.
  // Controls missing from a fragment keep their defaults. An uploaded image is too big for a URL: its search's
  // entry has none (a URL shared shows no search rather than another one), and keeps the image and the request
  // in the entry's state, for back and forward in this tab, unless it is bigger than KEPT_IMAGE_CHARS (each page
  // of its search is an entry with a copy of it, which the browser keeps for the tab's life).
  const KEPT_IMAGE_CHARS = 8 * 1024 * 1024;

  function recordInUrl(captions, how) {
    const body = captions ? captionsBody() : searchBody();
    const image = body.image && { dataUrl: body.image, name: state.query.image.name };
    delete body.image;
    const params = new URLSearchParams();
    if (captions) params.set('find', 'captions');
    for (const [name, value] of Object.entries(body)) {
      params.set(name, typeof value === 'string' ? value : JSON.stringify(value));
    }
    const url = image ? `${window.location.pathname}${window.location.search}` : `#${params}`;
    const kept = image && image.dataUrl.length <= KEPT_IMAGE_CHARS ? { image, params: String(params) } : null;
    if (how === 'push' && !image && url === window.location.hash) return;  // the same search again: no new entry
    const write = (entry) => (how === 'push' ? window.history.pushState(entry, '', url) : window.history.replaceState(entry, '', url));
    try {
      write(kept);
    } catch (err) {
      write(null);  // an image past what this browser keeps in an entry's state: back and forward show no search
    }
  }

  // The preview of an image kept in a history entry, from its data URL (the page may load no data: URLs).
  function imageFromEntry({ dataUrl, name }) {
    const [head, data] = dataUrl.split(',', 2);
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    const blob = new Blob([bytes], { type: head.slice('data:'.length).split(';')[0] });
    return { dataUrl, name, previewUrl: URL.createObjectURL(blob) };
  }

  // The filter controls set to `wanted` ({field: value}), any other field to any.
  function chooseFilters(wanted) {
    for (const select of $('filters').querySelectorAll('select')) {
      const value = wanted[select.dataset.field];
      const typed = $(`${select.id}-other`);
      if (value === undefined) select.value = '';
      else if ([...select.options].some((option) => option.value === JSON.stringify(value))) select.value = JSON.stringify(value);
      else select.value = typed ? OTHER_VALUE : '';  // without a box for other values: one no document holds
      if (typed) {
        typed.value = select.value === OTHER_VALUE ? String(value) : '';
        typed.hidden = select.value !== OTHER_VALUE;
      }
    }
  }

  function restoreFromUrl() {
    const kept = window.history.state && window.history.state.image ? window.history.state : null;
    const params = new URLSearchParams(kept ? kept.params : window.location.hash.slice(1));
    const json = (name) => { try { return JSON.parse(params.get(name)); } catch (err) { return null; } };
    const pick = (id, value) => {
      const known = [...$(id).options].some((option) => option.value === value);
      $(id).value = known ? value : $(id).options[0].value;
    };
    setImage(kept ? imageFromEntry(kept.image) : null);
    $('query').value = params.get('text') || '';
    setLike(params.get('like') ? { id: params.get('like') } : null);
    document.querySelector(`input[name="find"][value="${params.get('find') === 'captions' ? 'captions' : 'images'}"]`)
      .checked = true;
    pick('mode', params.get('mode') || '');
    pick('fusion', params.get('fusion') || 'minmax');
    const weights = json('weights') || {};
    $('weight-vector').value = weights.vector ?? 0.5;
    $('weight-bm25').value = weights.bm25 ?? 0.5;
    $('candidates').value = params.get('candidates') || '';
    pick('rerank', { true: 'on', false: 'off' }[params.get('rerank')] || '');
    pick('page-size', params.get('k') || '20');
    $('exact').checked = params.get('exact') === 'true';
    const wanted = json('filters') || {};
    chooseFilters(wanted);
    // No controls to set yet (a server that takes keys refuses the facets until one is typed): the filters wait for
    // them, or the search run again with the key would be of the URL's query unfiltered.
    state.wantedFilters = state.facetsShown ? null : wanted;
    state.offset = Math.max(0, Number.parseInt(params.get('offset'), 10) || 0);
    if (hasQuery()) {
      run({ record: null });
    } else {
      supersede();  // an answer still on its way is of another entry
      state.query = null;  // nothing shown: an option changed now has no search to run again
      $('results').removeAttribute('aria-busy');
      document.body.classList.remove('busy');
      renderNothing();
      clearError();
      $('status').textContent = '';
      $('empty').textContent = 'Type a query or choose an image to search.';
    }
  }

  // ---- query inputs -----------------------------------------------------------------------------

  // The query is no longer the URL's: the filters still waiting for the facets were its, not this one's.
  function dropUrlFilters() {
    state.wantedFilters = null;
  }

  function setLike(hit) {
    dropUrlFilters();
    state.like = hit ? { id: hit.id, text: hit.text || hit.id } : null;
    $('like-banner').hidden = !hit;
    const named = hit && hit.text ? `${hit.text} (${hit.id})` : hit && hit.id;  // from a URL: the id alone
    $('like-text').textContent = hit ? `More like this: ${named}` : '';
  }

  function moreLikeThis(hit) {
    // The stored document is the query: its own vector, no upload; text and image would change it.
    setImage(null);
    $('query').value = '';
    setLike(hit);
    state.offset = 0;
    run({ focusResults: true });
  }

  function setImage(image) {
    dropUrlFilters();
    if (state.image && state.image.previewUrl) URL.revokeObjectURL(state.image.previewUrl);
    state.image = image;
    $('image-preview').hidden = !image;
    $('image-preview-img').src = image ? image.previewUrl : '';
    $('image-preview-img').alt = image ? `Query image: ${image.name}` : '';
    $('image-name').textContent = image ? image.name : '';
    if (!image) $('image-file').value = '';
  }

  function useFile(file) {
    if (!file) return;
    const reader = new FileReader();
    reader.addEventListener('load', () => {
      setLike(null);
      setImage({ dataUrl: reader.result, name: file.name || 'pasted image', previewUrl: URL.createObjectURL(file) });
      state.offset = 0;
      run();
    });
    reader.addEventListener('error', () => showError(new Error(`could not read ${file.name || 'the pasted image'}: ${reader.error.message}`)));
    reader.readAsDataURL(file);
  }

  // ---- filters from the store's facets -------------------------------------------------------------

  let loadingFacets = null;  // the AbortController of the latest facets' load

  // Each key typed loads the facets again: a load still waiting is cancelled, so its answer (of the key before)
  // cannot land after the newer one's and replace it. Resolves false where a newer load superseded this one.
  async function loadFilters() {
    if (loadingFacets) loadingFacets.abort();
    const mine = new AbortController();
    loadingFacets = mine;
    const fieldset = $('filters');
    try {
      const answer = await api('/v1/facets', undefined, mine.signal);
      const fields = Object.entries(answer.facets).filter(([, facet]) => facet.values.length > 1);
      // Reloaded (a new API key): the values chosen (or typed) stay, or the next page would be of another ranking.
      const chosen = new Map([...fieldset.querySelectorAll('select')].map((select) => [select.dataset.field,
        { value: select.value, typed: $(`${select.id}-other`)?.value }]));
      fieldset.querySelectorAll('label').forEach((node) => node.remove());
      $('filters-note').textContent = fields.length ? '' : 'No metadata fields to filter by in this store.';
      $('filters-note').hidden = fields.length > 0;
      // Ids by position: names can differ only in characters an id would have to drop ("a b", "a_b"; 色, 形).
      for (const [index, [name, facet]] of fields.entries()) {
        const id = `filter-${index}`;
        const before = chosen.get(name) || {};
        const options = [el('option', { value: '' }, 'any'),
          ...facet.values.map(({ value, count }) => el('option', { value: JSON.stringify(value) }, `${format(value)} (${count})`))];
        // `other` counts documents, not values: one unlisted value held by ten documents is ten.
        const holders = facet.other === 1 ? '1 document holds' : `${facet.other} documents hold`;
        if (facet.other > 0) options.push(el('option', { value: OTHER_VALUE }, `other value… (${holders} values not listed)`));
        const select = el('select', { id, 'data-field': name }, ...options);
        if (options.some((option) => option.value === before.value)) select.value = before.value;
        const label = el('label', { for: id }, name, select);
        if (facet.other > 0) {
          const typed = el('input', { id: `${id}-other`, type: 'text', spellcheck: 'false', placeholder: 'type a value',
            'aria-label': `${name}: a value not listed` });
          if (facet.values.every(({ value }) => typeof value === 'number')) typed.dataset.numbers = 'yes';
          typed.value = before.typed || '';
          typed.hidden = select.value !== OTHER_VALUE;
          select.addEventListener('change', () => {
            typed.hidden = select.value !== OTHER_VALUE;
            if (!typed.hidden) typed.focus();
          });
          label.append(typed);
        }
        fieldset.append(label);
      }
      if (state.wantedFilters) chooseFilters(state.wantedFilters);
      state.wantedFilters = null;
      state.facetsShown = true;
      if (answer.documents !== undefined) updateCount(answer.documents);
    } catch (problem) {
      if (mine.signal.aborted) return false;
      const { title, detail } = describe(problem);
      $('filters-note').textContent = `Filters unavailable. ${title} ${detail}`;
    }
    return true;
  }

  let info = {};
  function updateCount(documents) {
    info.documents = documents;
    const parts = [`${info.documents} documents`];
    if (info.store) parts.push(`${info.store} store`);
    if (info.model) parts.push(`model ${info.model}`);
    $('store-info').textContent = parts.join(' · ');
  }

  let loadingInfo = null;  // the AbortController of the latest /readyz call

  // Each key typed asks again: a call still waiting is cancelled, so its answer (of the key before) cannot land
  // after the newer one's and replace the header, the error shown or the wait the page gives a call.
  async function loadInfo() {
    if (loadingInfo) loadingInfo.abort();
    const mine = new AbortController();
    loadingInfo = mine;
    try {
      const ready = await api('/readyz', undefined, mine.signal);
      // Without a key a server that takes keys says only whether it is ready; nothing else on the page would work.
      if (ready.model === undefined) {
        throw new ApiProblem(401, 'unauthorized', 'without one it answers only whether it is ready');
      }
      info = { store: ready.store, model: ready.model };
      if (ready.request_timeout_s > 0) requestTimeoutS = ready.request_timeout_s;
      updateCount(ready.documents);
      if (state.infoRefused) clearError();  // the key now typed fixed what loading the page said
    } catch (caught) {
      if (mine.signal.aborted) return;
      // Not ready, and no reason: a server that takes keys says why only to a caller with one (and nothing else
      // on the page works without one), so ask for the key rather than show the bare HTTP status.
      const unexplained = caught instanceof ApiProblem && caught.code === 'not_ready' && !(caught.answer || {}).reason;
      const problem = unexplained
        ? new ApiProblem(401, 'unauthorized', 'without one it says only that it is not ready, not why') : caught;
      // Without a key nothing on the page works: say so where errors are read, not only in the header.
      const refused = problem instanceof ApiProblem && problem.status === 401;
      if (state.infoRefused && !refused) clearError();  // the key now typed fixed what loading the page said
      state.infoRefused = refused;
      if (refused) showError(problem);
      const { title, detail } = describe(problem);
      $('store-info').textContent = `${title} ${detail}`;
    }
  }

  // ---- wiring -----------------------------------------------------------------------------------------

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    state.offset = 0;
    run();
  });
  $('image-file').addEventListener('change', () => useFile($('image-file').files[0]));
  $('clear-image').addEventListener('click', () => { setImage(null); $('image-file').focus(); });
  $('clear-like').addEventListener('click', () => { setLike(null); $('query').focus(); });
  $('query').addEventListener('input', dropUrlFilters);

  const zone = $('drop-zone');
  ['dragenter', 'dragover'].forEach((name) => zone.addEventListener(name, (event) => {
    event.preventDefault();
    zone.classList.add('dragging');
  }));
  ['dragleave', 'drop'].forEach((name) => zone.addEventListener(name, () => zone.classList.remove('dragging')));
  zone.addEventListener('drop', (event) => {
    event.preventDefault();
    useFile(event.dataTransfer.files[0]);
  });
  document.addEventListener('paste', (event) => {
    const file = [...(event.clipboardData ? event.clipboardData.files : [])].find((f) => f.type.startsWith('image/'));
    if (file) {
      event.preventDefault();
      useFile(file);
    }
  });

  // Changing how to rank re-runs the search being looked at (not text typed since), from its first page, in its
  // own history entry.
  function rankAgain() {
    if (!state.query) return;
    state.offset = 0;
    run({ again: true, record: 'replace' });
  }
  for (const id of ['mode', 'fusion', 'weight-vector', 'weight-bm25', 'candidates', 'rerank', 'page-size', 'exact']) {
    $(id).addEventListener('change', rankAgain);
  }
  $('filters').addEventListener('change', rankAgain);
  document.querySelectorAll('input[name="find"]').forEach((radio) => radio.addEventListener('change', () => {
    if (state.query && (state.query.image || state.query.like)) rankAgain();
  }));

  $('prev-page').addEventListener('click', () => {
    state.offset = Math.max(0, state.offset - Number($('page-size').value));
    run({ focusResults: true, paging: true });
  });
  $('next-page').addEventListener('click', () => {
    state.offset = Number($('next-page').dataset.offset);
    run({ focusResults: true, paging: true });
  });

  const key = $('api-key');
  key.value = sessionStorage.getItem(KEY_STORAGE) || '';
  if (key.value) $('key-settings').open = true;
  key.addEventListener('change', () => {
    if (key.value.trim()) sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    else sessionStorage.removeItem(KEY_STORAGE);
    loadInfo();
    // The search the old key (or none) was refused runs again once the facets arrived: with the filters its URL asked for.
    loadFilters().then((current) => { if (current && state.keyRefused && hasQuery()) run({ record: 'replace' }); });
  });

  window.addEventListener('popstate', restoreFromUrl);
  loadInfo();
  // A reloaded image search's entry keeps its state, though its URL has no fragment.
  loadFilters().then(() => { if (window.location.hash.length > 1 || window.history.state) restoreFromUrl(); });
})();
