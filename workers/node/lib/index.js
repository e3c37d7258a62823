'use strict';

const worker = require('./worker');
const client = require('./client');
const values = require('./values');
const errors = require('./errors');

module.exports = {
  ...worker,
  ...client,
  toValue: values.toValue,
  fromValue: values.fromValue,
  UnencodableValue: values.UnencodableValue,
  withErrorDetails: errors.withErrorDetails,
};
