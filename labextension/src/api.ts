import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** One placement setting set the worker runs with. */
export interface IPlacement {
  device: string;
  n_gpu_layers: number;
  n_layers: number;
  threads: number;
  n_ctx: number;
  n_batch: number;
  type_k: string;
  type_v: string;
  flash_attn: string;
  nodes?: string[];
}

/** A running engine, as its kernel publishes it (workbench/engine/status.py). */
export interface IEngine {
  id: string;
  kernel_pid: number;
  kernel_id: string | null;
  notebook: string | null;
  worker_pid: number | null;
  state: string;
  model: {
    name: string;
    path: string;
    architecture: string;
    quantization: string;
    file_bytes: number;
  } | null;
  placement: IPlacement | null;
  memory: {
    worker_rss_bytes: number | null;
    worker_gpu_bytes: number | null;
  };
  requests: number;
  last_tps: number | null;
  last_ttft_s: number | null;
  history: { t: number; tps: number; ttft_s: number }[];
  restarts: number;
  last_crash: string | null;
  updated: number;
}

/** A model the workbench can load: the default one, or a GGUF file found on disk. */
export interface IModel {
  name: string;
  label: string;
  path: string;
  source: string;
  size: number;
  quantization: string;
  architecture: string;
  problem: string;
  load: string;
}

/** Call the workbench server extension's REST API (under <base_url>/workbench/). */
export async function requestAPI<T>(
  endPoint: string,
  init: RequestInit = {}
): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'workbench', endPoint);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new ServerConnection.NetworkError(error as TypeError);
  }
  const text = await response.text();
  let data: any = text;
  if (text.length > 0) {
    try {
      data = JSON.parse(text);
    } catch {
      // not JSON: keep the text for the error message
    }
  }
  if (!response.ok) {
    throw new ServerConnection.ResponseError(response, data?.message ?? text);
  }
  return data as T;
}

export function formatBytes(n: number | null | undefined): string {
  if (n === null || n === undefined) {
    return '–';
  }
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i >= 2 ? 1 : 0)} ${units[i]}`;
}
