import { showErrorMessage } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookActions } from '@jupyterlab/notebook';
import { Widget } from '@lumino/widgets';

import { formatBytes, IEngine, IModel, requestAPI } from './api';
import { sparkline } from './sparkline';
import { EngineStore, StoreView } from './store';

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className = '',
  text = ''
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text) {
    node.textContent = text;
  }
  return node;
}

function row(table: HTMLElement, key: string, value: string): void {
  const tr = el('tr');
  tr.appendChild(el('th', '', key));
  tr.appendChild(el('td', '', value));
  table.appendChild(tr);
}

/** Where and how the model runs, in one line. */
export function describePlacement(e: IEngine): string {
  const p = e.placement;
  if (!p) {
    return '–';
  }
  const nodes = p.nodes ?? [];
  const layers =
    p.device === 'cluster'
      ? `split across ${nodes.length} RPC node${nodes.length === 1 ? '' : 's'}`
      : p.device === 'cpu'
        ? 'CPU'
        : `${p.n_gpu_layers}/${p.n_layers + 1} layers on GPU`;
  return `${layers} · ${p.threads} threads · ctx ${p.n_ctx} · KV ${p.type_k}`;
}

/** The running workbench engines, one card each, with sparklines and a Stop button. */
export class EnginesView extends StoreView {
  constructor(store: EngineStore) {
    super(store, 'jp-Workbench-engines');
    this.render();
  }

  protected render(): void {
    const root = this.node;
    root.replaceChildren(el('h3', 'jp-Workbench-heading', 'Engines'));
    if (this.store.error) {
      root.appendChild(el('p', 'jp-Workbench-error', this.store.error));
      return;
    }
    const engines = this.store.engines;
    if (engines.length === 0) {
      const empty = el('div', 'jp-Workbench-empty');
      empty.appendChild(el('p', '', 'No workbench engine is running.'));
      empty.appendChild(
        el('p', 'jp-Workbench-hint', 'Load a model from a notebook: %load_ext workbench, then %load_model.')
      );
      root.appendChild(empty);
      return;
    }
    for (const e of engines) {
      root.appendChild(this._card(e));
    }
  }

  private _card(e: IEngine): HTMLElement {
    const card = el('div', 'jp-Workbench-engine');
    card.dataset.engineId = e.id;
    card.dataset.state = e.state;
    const head = el('div', 'jp-Workbench-engineHead');
    head.appendChild(el('span', 'jp-Workbench-model', e.model ? e.model.name : 'no model'));
    head.appendChild(
      el('span', `jp-Workbench-state jp-Workbench-state-${e.state.replace(/\s+/g, '-')}`, e.state)
    );
    card.appendChild(head);

    const table = el('table', 'jp-Workbench-facts');
    row(table, 'kernel', `${e.notebook || e.kernel_id || 'python'} (pid ${e.kernel_pid})`);
    if (e.model) {
      row(table, 'quantization', `${e.model.quantization} · ${formatBytes(e.model.file_bytes)}`);
    }
    row(table, 'placement', describePlacement(e));
    const gpu = e.memory.worker_gpu_bytes ? ` · GPU ${formatBytes(e.memory.worker_gpu_bytes)}` : '';
    row(table, 'memory', `${formatBytes(e.memory.worker_rss_bytes)}${gpu}`);
    row(table, 'requests', `${e.requests}` + (e.restarts ? ` · ${e.restarts} restarts` : ''));
    card.appendChild(table);

    const charts = el('div', 'jp-Workbench-charts');
    const tps = el('div', 'jp-Workbench-chart jp-Workbench-tps');
    tps.appendChild(
      el('span', '', e.last_tps !== null ? `${e.last_tps.toFixed(1)} tok/s` : '– tok/s')
    );
    tps.appendChild(sparkline(e.history.map(h => h.tps), 'decode tokens per second'));
    const ttft = el('div', 'jp-Workbench-chart jp-Workbench-ttft');
    ttft.appendChild(
      el('span', '', e.last_ttft_s !== null ? `TTFT ${(e.last_ttft_s * 1000).toFixed(0)} ms` : 'TTFT –')
    );
    ttft.appendChild(sparkline(e.history.map(h => h.ttft_s), 'time to first token'));
    charts.appendChild(tps);
    charts.appendChild(ttft);
    card.appendChild(charts);

    if (e.last_crash && e.state === 'crashed') {
      card.appendChild(el('p', 'jp-Workbench-error', e.last_crash));
    }
    const stop = el('button', 'jp-mod-styled jp-mod-warn jp-Workbench-stop', 'Stop');
    stop.title = 'Stop the worker and free its model (the kernel keeps running)';
    stop.disabled = e.state === 'stopped';
    stop.onclick = async () => {
      stop.disabled = true;
      stop.textContent = 'Stopping…';
      try {
        await this.store.stop(e.id);
      } catch (error) {
        await showErrorMessage('Could not stop the engine', String(error));
      }
    };
    card.appendChild(stop);
    return card;
  }
}

/** The default model and the GGUF files on disk, each with a button that inserts a
 * `%load_model` cell into the current notebook. */
export class ModelsView extends Widget {
  constructor(tracker: INotebookTracker | null) {
    super();
    this.addClass('jp-Workbench-models');
    this._tracker = tracker;
    this.node.appendChild(el('h3', 'jp-Workbench-heading', 'Models'));
    void this.refresh();
  }

  async refresh(): Promise<void> {
    const list = el('div', 'jp-Workbench-modelList');
    try {
      const reply = await requestAPI<{ models: IModel[] }>('models');
      for (const m of reply.models) {
        list.appendChild(this._item(m));
      }
    } catch (error) {
      list.appendChild(el('p', 'jp-Workbench-error', `Could not list the models: ${error}`));
    }
    const refresh = el('button', 'jp-mod-styled jp-Workbench-refresh', 'Refresh');
    refresh.onclick = () => void this.refresh();
    this.node.replaceChildren(el('h3', 'jp-Workbench-heading', 'Models'), list, refresh);
  }

  private _item(m: IModel): HTMLElement {
    const item = el('div', 'jp-Workbench-modelItem');
    item.dataset.model = m.name;
    item.appendChild(el('div', 'jp-Workbench-modelName', m.label));
    const facts = m.problem
      ? m.problem
      : `${m.source} · ${m.architecture} · ${m.quantization} · ${formatBytes(m.size)}`;
    item.appendChild(el('div', 'jp-Workbench-modelFacts', facts));
    const insert = el('button', 'jp-mod-styled jp-mod-accept jp-Workbench-insert', 'Insert %load_model');
    insert.title = `Insert a cell that runs: ${m.load}`;
    insert.disabled = !!m.problem;
    insert.onclick = () => void this._insert(m.load);
    item.appendChild(insert);
    return item;
  }

  private async _insert(load: string): Promise<void> {
    const panel = this._tracker?.currentWidget;
    if (!panel) {
      await showErrorMessage('No notebook is open', 'Open a notebook, then insert the cell again.');
      return;
    }
    const notebook = panel.content;
    const loaded = notebook.widgets.some(c =>
      c.model.sharedModel.getSource().includes('%load_ext workbench')
    );
    NotebookActions.insertBelow(notebook);
    const cell = notebook.activeCell;
    if (cell) {
      cell.model.sharedModel.setSource(loaded ? load : `%load_ext workbench\n${load}`);
    }
  }

  private _tracker: INotebookTracker | null;
}
