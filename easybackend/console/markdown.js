// A small Markdown renderer that builds DOM nodes: model text only ever becomes text nodes
// (textContent), never HTML, so an answer holding <img onerror=…> shows as it is written.
// Handles fenced code blocks, headings, lists, tables, paragraphs, `code`, **bold**, *em*.

const INLINE = /(`[^`]+`|\*\*[^*]+\*\*|\*[^*\s][^*]*\*)/;

function el(tag, text) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  return node;
}

export function inline(parent, text) {
  for (const part of text.split(INLINE)) {
    if (!part) continue;
    if (part.startsWith("`") && part.endsWith("`") && part.length > 2) {
      parent.append(el("code", part.slice(1, -1)));
    } else if (part.startsWith("**") && part.endsWith("**") && part.length > 4) {
      parent.append(el("strong", part.slice(2, -2)));
    } else if (part.startsWith("*") && part.endsWith("*") && part.length > 2) {
      parent.append(el("em", part.slice(1, -1)));
    } else {
      parent.append(document.createTextNode(part));
    }
  }
  return parent;
}

const cells = (line) => line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
const isRule = (line) => /^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$/.test(line);
const LIST = /^\s*([-*+]|\d+[.)])\s+(.*)$/;

export function render(text) {
  const root = document.createDocumentFragment();
  const lines = text.replace(/\r\n/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (/^\s*```/.test(line)) {
      const body = [];
      for (i++; i < lines.length && !/^\s*```/.test(lines[i]); i++) body.push(lines[i]);
      i++; // the closing fence (or the end of a still-streaming answer)
      const pre = el("pre");
      pre.append(el("code", body.join("\n")));
      root.append(pre);
    } else if (/^#{1,6}\s/.test(line)) {
      const level = line.match(/^#+/)[0].length;
      root.append(inline(el("h" + Math.min(level + 2, 6)), line.replace(/^#+\s*/, "")));
      i++;
    } else if (line.includes("|") && i + 1 < lines.length && isRule(lines[i + 1])) {
      const table = el("table");
      const head = el("tr");
      for (const c of cells(line)) head.append(inline(el("th"), c));
      table.append(head);
      for (i += 2; i < lines.length && lines[i].includes("|"); i++) {
        const row = el("tr");
        for (const c of cells(lines[i])) row.append(inline(el("td"), c));
        table.append(row);
      }
      root.append(table);
    } else if (LIST.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const list = el(ordered ? "ol" : "ul");
      for (; i < lines.length && LIST.test(lines[i]); i++) {
        list.append(inline(el("li"), lines[i].match(LIST)[2]));
      }
      root.append(list);
    } else if (!line.trim()) {
      i++;
    } else {
      const para = [];
      for (; i < lines.length && lines[i].trim() && !/^\s*```/.test(lines[i]) && !LIST.test(lines[i]) && !/^#{1,6}\s/.test(lines[i]); i++) {
        para.push(lines[i]);
      }
      const p = el("p");
      para.forEach((text, n) => {
        if (n) p.append(el("br"));
        inline(p, text);
      });
      root.append(p);
    }
  }
  return root;
}
