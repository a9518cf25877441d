const SVG = 'http://www.w3.org/2000/svg';

/** A small SVG line chart of `values` (oldest first), scaled to its own range. */
export function sparkline(
  values: number[],
  label: string,
  width = 120,
  height = 24
): SVGSVGElement {
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('width', String(width));
  svg.setAttribute('height', String(height));
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', label);
  svg.classList.add('jp-Workbench-sparkline');
  const finite = values.filter(v => Number.isFinite(v));
  if (finite.length === 0) {
    return svg;
  }
  const lo = Math.min(...finite);
  const hi = Math.max(...finite);
  const span = hi - lo || 1;
  const step = finite.length > 1 ? (width - 4) / (finite.length - 1) : 0;
  const points = finite.map((v, i) => {
    const x = 2 + i * step;
    const y = height - 2 - ((v - lo) / span) * (height - 4);
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  const line = document.createElementNS(SVG, 'polyline');
  line.setAttribute('points', points.join(' '));
  line.setAttribute('fill', 'none');
  line.setAttribute('stroke', 'currentColor');
  line.setAttribute('stroke-width', '1.5');
  svg.appendChild(line);
  const last = points[points.length - 1].split(',');
  const dot = document.createElementNS(SVG, 'circle');
  dot.setAttribute('cx', last[0]);
  dot.setAttribute('cy', last[1]);
  dot.setAttribute('r', '2');
  dot.setAttribute('fill', 'currentColor');
  svg.appendChild(dot);
  return svg;
}
