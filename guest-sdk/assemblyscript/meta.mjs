// meta.mjs: an asc transform (`asc ... --transform path/to/meta.mjs`) that
// writes plugin metadata, the `msrwasm.meta` custom section that
// `msrwasm check` prints, from a string constant in the plugin's source:
//
//   const MSRWASM_META = `
//   name = "rapl"
//   version = "1.0.0"
//   `;
//
// The text is TOML (keys with string values: name, version, description,
// author, ...). The transform takes the constant out of the program, so it
// costs nothing at run time (and cannot be used from code). AssemblyScript has
// no syntax for custom sections; binaryen, which asc compiles with, has.

const NAME = "MSRWASM_META";

/** The text of a string literal or of a template literal without `${}`; else null. */
function literalText(node) {
  if (node == null) return null;
  if (typeof node.value === "string") return node.value;
  if (Array.isArray(node.parts) && node.parts.length === 1 && (node.expressions ?? []).length === 0) {
    return node.parts[0];
  }
  return null;
}

export default class MsrwasmMeta {
  afterParse(parser) {
    this.meta = null;
    for (const source of parser.sources) {
      if (source.isLibrary || source.internalPath.startsWith("~lib/")) continue;
      source.statements = source.statements.filter((statement) => {
        const declarations = statement.declarations;
        if (!Array.isArray(declarations)) return true;
        statement.declarations = declarations.filter((declaration) => {
          if (declaration.name?.text !== NAME) return true;
          const where = `${source.normalizedPath}: ${NAME}`;
          const text = literalText(declaration.initializer);
          if (text === null) throw new Error(`${where} must be a string literal (or a template literal without \${})`);
          if (this.meta !== null) throw new Error(`${where} is defined a second time`);
          this.meta = text;
          return false; // the section carries it: no string in the module's data
        });
        return statement.declarations.length > 0;
      });
    }
  }

  afterCompile(module) {
    if (this.meta !== null) {
      module.addCustomSection("msrwasm.meta", new TextEncoder().encode(this.meta));
    }
  }
}
