// Redrawing an overlay in the browser from the maps the explain endpoint returns, the way the
// server draws its own (service/engine/pictures/overlays.py and preprocess.map_to_original), so that
// moving a slider needs no new request.

/**
 * @typedef {{rows: number, cols: number, values: Float32Array}} Grid  a map, row-major
 * @typedef {{left: number, top: number, right: number, bottom: number}} Box
 */

/** A map of the API (`encoding=base64`: little-endian float32, row-major) as a Grid. */
export function decodeMap(map) {
  const [rows, cols] = map.shape;
  const bytes = Uint8Array.from(atob(map.data), (c) => c.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  const values = new Float32Array(rows * cols);
  for (let i = 0; i < values.length; i += 1) values[i] = view.getFloat32(4 * i, true);
  return { rows, cols, values };
}

/** A colour table from /ui/options.json (hex of 256 RGB triplets) as 768 bytes. */
export function decodeLut(hex) {
  const lut = new Uint8Array(hex.length / 2);
  for (let i = 0; i < lut.length; i += 1) lut[i] = parseInt(hex.substr(2 * i, 2), 16);
  return lut;
}

/**
 * The grid map with the original script's floor instead of ReLU: values under
 * `threshold x peak` raised to it, then divided by the peak (the server's `threshold` option),
 * computed from `raw_heatmap` (the ReLU'd map in the layer's units).
 */
export function floorMap(raw, threshold) {
  let peak = 0;
  for (const v of raw.values) peak = Math.max(peak, v);
  const values = new Float32Array(raw.values.length);
  if (peak > 0) {
    const floor = peak * threshold;
    for (let i = 0; i < values.length; i += 1) {
      values[i] = Math.max(raw.values[i], floor) / (peak + 1e-7);
    }
  }
  return { rows: raw.rows, cols: raw.cols, values };
}

// For each of `size` display pixels along one axis: the two grid cells it is interpolated
// between, the weight of the second, and whether the model saw it (bilinear sampling at pixel
// centres with edge values held, like torch's grid_sample with align_corners=False).
function axis(size, originalSize, start, end, cells) {
  const low = new Int32Array(size);
  const high = new Int32Array(size);
  const weight = new Float32Array(size);
  const seen = new Uint8Array(size);
  for (let i = 0; i < size; i += 1) {
    const x = ((i + 0.5) * originalSize) / size;
    seen[i] = x >= start && x < end ? 1 : 0;
    const cell = Math.min(Math.max(((x - start) / (end - start)) * cells - 0.5, 0), cells - 1);
    low[i] = Math.floor(cell);
    high[i] = Math.min(low[i] + 1, cells - 1);
    weight[i] = cell - low[i];
  }
  return { low, high, weight, seen };
}

/**
 * The grid map resized onto the image shown at `width` x `height` pixels: the grid spans
 * `box` (the model input's box on the `original` image); pixels the model never saw are 0.
 * Min-max normalised to [0, 1] as the server does it, unless `normalize` is false (a map with
 * the threshold floor keeps it: the server's rule, PostProcess.renormalizes in
 * service/engine/cam/explain.py; tests/api/test_page_in_browser.py holds the two together).
 */
export function mapOntoImage(grid, box, original, width, height, normalize = true) {
  const xs = axis(width, original.width, box.left, box.right, grid.cols);
  const ys = axis(height, original.height, box.top, box.bottom, grid.rows);
  const v = grid.values;
  const out = new Float32Array(width * height);
  let min = Infinity;
  for (let y = 0; y < height; y += 1) {
    const top = ys.low[y] * grid.cols;
    const bottom = ys.high[y] * grid.cols;
    const wy = ys.weight[y];
    for (let x = 0; x < width; x += 1) {
      let value = 0;
      if (ys.seen[y] && xs.seen[x]) {
        const l = xs.low[x];
        const h = xs.high[x];
        const wx = xs.weight[x];
        const upper = v[top + l] * (1 - wx) + v[top + h] * wx;
        const lower = v[bottom + l] * (1 - wx) + v[bottom + h] * wx;
        value = upper * (1 - wy) + lower * wy;
      }
      out[y * width + x] = value;
      min = Math.min(min, value);
    }
  }
  if (!normalize) return out;
  let max = 0;
  for (let i = 0; i < out.length; i += 1) {
    out[i] -= min;
    max = Math.max(max, out[i]);
  }
  for (let i = 0; i < out.length; i += 1) out[i] /= max + 1e-7;
  return out;
}

/** Round half to even, as NumPy's rint does on the server. */
function rint(x) {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** The colour of `value` in [0, 1]: entry rint(value x 255) of the table. */
function lutIndex(value) {
  const clipped = Math.min(Math.max(Number.isNaN(value) ? 0 : value, 0), 1);
  return 3 * rint(clipped * 255);
}

// The hatching of what the model did not see, as the server draws it (overlays.HATCH_*).
const HATCH_PERIOD = 8;
const HATCH_WIDTH = 2;
const HATCH_GREY = 160;

/**
 * Which pixels of the image shown at `width` x `height` the model never saw (outside `box`,
 * the model input's box on the `original` image; the same test as mapOntoImage's): a
 * Uint8Array of 1s there, or null when it saw them all.
 */
export function notSeenMask(box, original, width, height) {
  const xs = axis(width, original.width, box.left, box.right, 1).seen;
  const ys = axis(height, original.height, box.top, box.bottom, 1).seen;
  if (xs.every(Boolean) && ys.every(Boolean)) return null;
  const mask = new Uint8Array(width * height);
  for (let y = 0; y < height; y += 1) {
    for (let x = 0; x < width; x += 1) mask[y * width + x] = ys[y] && xs[x] ? 0 : 1;
  }
  return mask;
}

/**
 * `(1 - alpha) x image + alpha x colour(map)` into `target` (an ImageData of the image's size);
 * `image` is the RGBA bytes of the picture the map lies on. In 8.8 fixed point, as the server
 * blends: `(image x (256 - w) + colour x w + 128) >> 8` with `w = rint(alpha x 256)`. Where
 * `notSeen` (notSeenMask) is 1, the colour is the image's grey, hatched, as on the server
 * (overlays.not_seen_colour): `(77 R + 150 G + 29 B + 128) >> 8`, and on the stripes
 * (`(x + y) % 8 < 2`) that grey's mean with 160.
 */
export function paintOverlay(target, image, map, lut, alpha, notSeen = null) {
  const out = target.data;
  const { width } = target;
  const w = rint(alpha * 256);
  const keep = 256 - w;
  for (let i = 0, p = 0; i < map.length; i += 1, p += 4) {
    let r;
    let g;
    let b;
    if (notSeen && notSeen[i]) {
      let grey = (image[p] * 77 + image[p + 1] * 150 + image[p + 2] * 29 + 128) >> 8;
      if (((i % width) + Math.floor(i / width)) % HATCH_PERIOD < HATCH_WIDTH) {
        grey = (grey + HATCH_GREY) >> 1;
      }
      r = grey;
      g = grey;
      b = grey;
    } else {
      const c = lutIndex(map[i]);
      r = lut[c];
      g = lut[c + 1];
      b = lut[c + 2];
    }
    out[p] = (image[p] * keep + r * w + 128) >> 8;
    out[p + 1] = (image[p + 1] * keep + g * w + 128) >> 8;
    out[p + 2] = (image[p + 2] * keep + b * w + 128) >> 8;
    out[p + 3] = 255;
  }
}

/** The legend's swatch of what the model did not see: mid grey, hatched. */
export function paintNotSeen(target) {
  const out = target.data;
  for (let y = 0; y < target.height; y += 1) {
    for (let x = 0; x < target.width; x += 1) {
      const grey = (x + y) % HATCH_PERIOD < HATCH_WIDTH ? (200 + HATCH_GREY) >> 1 : 200;
      out.set([grey, grey, grey, 255], 4 * (y * target.width + x));
    }
  }
}

/** The colour scale, low to high, into a 256-pixel wide ImageData. */
export function paintScale(target, lut) {
  const out = target.data;
  for (let x = 0; x < target.width; x += 1) {
    const c = lutIndex(x / (target.width - 1));
    for (let y = 0; y < target.height; y += 1) {
      const p = 4 * (y * target.width + x);
      out.set([lut[c], lut[c + 1], lut[c + 2], 255], p);
    }
  }
}
